"""ldm.schedulers against diffusers' schedulers built with the Stable Diffusion config, step by step."""

import numpy as np
import pytest
import torch

from ldm.schedulers import (
    NoiseSchedule,
    ddim_sigma,
    leading_timesteps,
    linspace_timesteps,
    log_linear_sigma_grid,
    make_sampler,
    predict_eps_x0,
    velocity,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 copy warning

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def reference_scheduler(name, prediction_type="epsilon", spacing=None):
    """diffusers scheduler with the SD config written out (not diffusers' defaults)."""
    if name == "ddim":
        return diffusers.DDIMScheduler(
            **SD_CONFIG, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
            timestep_spacing="leading", prediction_type=prediction_type,
        )
    if name == "ddpm":
        return diffusers.DDPMScheduler(
            **SD_CONFIG, steps_offset=1, clip_sample=False, variance_type="fixed_small",
            timestep_spacing="leading", prediction_type=prediction_type,
        )
    return diffusers.EulerAncestralDiscreteScheduler(
        **SD_CONFIG, steps_offset=1, timestep_spacing=spacing or "linspace", prediction_type=prediction_type
    )


def fake_model(x, t):
    """A deterministic stand-in for the UNet: depends on both the input and the (real-valued) timestep."""
    return 0.1 * x + 0.05 * torch.sin(torch.as_tensor(t, dtype=torch.float32) / 50.0 + x)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.scaled_linear()


def test_schedule_matches_reference_numbers(schedule):
    ref = reference_scheduler("ddim")
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    # docs/methods.md §0.1 and §4.1 (σ_t of the 100-step edit-friendly grid)
    assert schedule.alpha_bar(0).item() == pytest.approx(0.99915, abs=1e-5)
    assert schedule.alpha_bar(999).item() == pytest.approx(0.00466, abs=1e-5)
    assert schedule.alpha_bar(-19).item() == schedule.alpha_bar(0).item()  # final alpha = ᾱ_0
    for t, expected in [(991, 0.334), (631, 0.247), (251, 0.150), (11, 0.038), (1, 0.0207)]:
        sigma = ddim_sigma(schedule.alpha_bar(t), schedule.alpha_bar(t - 10), eta=1.0)
        assert sigma.item() == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("num_steps", [10, 37, 50, 100])
def test_timesteps_match_diffusers(schedule, num_steps):
    for name in ("ddim", "ddpm"):
        ref = reference_scheduler(name)
        ref.set_timesteps(num_steps)
        ours = make_sampler(name, schedule, num_steps).timesteps
        assert torch.equal(ours, ref.timesteps), name
    for spacing in ("linspace", "leading"):
        ref = reference_scheduler("euler-a", spacing=spacing)
        ref.set_timesteps(num_steps)
        sampler = make_sampler("euler-a", schedule, num_steps, spacing=spacing)
        torch.testing.assert_close(sampler.timesteps, ref.timesteps, rtol=0, atol=1e-4)
        torch.testing.assert_close(sampler.sigmas, ref.sigmas, rtol=1e-6, atol=0)
        assert sampler.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert leading_timesteps(50).tolist() == list(range(981, 0, -20))
    assert linspace_timesteps(num_steps)[0] == 999.0 and linspace_timesteps(num_steps)[-1] == 0.0


def run_reference(ref, num_steps, eta, seed, start=0, x_start=None):
    ref.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    if x_start is None:
        x = torch.randn(SHAPE, generator=generator) * ref.init_noise_sigma
    else:
        x = x_start
        if hasattr(ref, "set_begin_index"):  # Euler indexes σ by step, DDIM/DDPM by timestep
            ref.set_begin_index(start)
    for t in ref.timesteps[start:]:
        model_in = ref.scale_model_input(x, t)
        extra = {"eta": eta} if isinstance(ref, diffusers.DDIMScheduler) else {}
        x = ref.step(fake_model(model_in, t), t, x, generator=generator, **extra).prev_sample
    return x, generator


def run_ours(sampler, seed, start=0, x_start=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * sampler.init_noise_sigma if x_start is None else x_start
    for i in range(start, sampler.num_steps):
        model_in = sampler.scale_model_input(x, i)
        x = sampler.step(fake_model(model_in, sampler.timesteps[i]), i, x, generator)
    return x, generator


CASES = [("ddim", 0.0, None), ("ddim", 1.0, None), ("ddim", 0.5, None), ("ddpm", 0.0, None),
         ("euler-a", 0.0, "linspace"), ("euler-a", 0.0, "leading")]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,eta,spacing", CASES)
def test_sampling_loop_matches_diffusers(schedule, name, eta, spacing, prediction_type):
    num_steps = 25
    ref = reference_scheduler(name, prediction_type, spacing)
    ref_x, ref_generator = run_reference(ref, num_steps, eta, seed=3)
    sampler = make_sampler(name, schedule, num_steps, eta, prediction_type, spacing)
    x, generator = run_ours(sampler, seed=3)
    assert torch.isfinite(x).all() and x.abs().max() > 0.1
    torch.testing.assert_close(x, ref_x, rtol=1e-5, atol=1e-5)
    # the same number of draws: the generator ends in the same state
    assert torch.equal(generator.get_state(), ref_generator.get_state())


def test_scale_model_input_matches_diffusers(schedule):
    ref = reference_scheduler("euler-a")
    ref.set_timesteps(20)
    sampler = make_sampler("euler-a", schedule, 20)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref.set_begin_index(7)
    torch.testing.assert_close(sampler.scale_model_input(x, 7), ref.scale_model_input(x, ref.timesteps[7]))
    assert not torch.allclose(sampler.scale_model_input(x, 7), x)
    assert sampler.scale_model_input(x, 7) is not x
    ddim = make_sampler("ddim", schedule, 20)
    assert torch.equal(ddim.scale_model_input(x, 7), x) and ddim.init_noise_sigma == 1.0


@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler-a"])  # the others: tests/test_sampler_parity.py
def test_img2img_start_and_add_noise_match_diffusers(schedule, name, strength):
    num_steps = 20
    ref = reference_scheduler(name)
    ref.set_timesteps(num_steps)
    # diffusers StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    ref_timesteps = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)

    sampler = make_sampler(name, schedule, num_steps)
    start = sampler.start_index(strength)
    assert start == t_start
    torch.testing.assert_close(sampler.timesteps[start:], ref_timesteps, rtol=0, atol=0)

    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    ref_xt = ref.add_noise(x0, noise, ref_timesteps[:1].repeat(SHAPE[0]))
    xt = sampler.add_noise(x0, noise, start)
    torch.testing.assert_close(xt, ref_xt, rtol=1e-6, atol=1e-6)

    # and the partial loop from there
    ref_x, _ = run_reference(reference_scheduler(name), num_steps, 0.0, seed=5, start=start, x_start=ref_xt)
    x, _ = run_ours(sampler, seed=5, start=start, x_start=xt)
    torch.testing.assert_close(x, ref_x, rtol=1e-5, atol=1e-5)


def test_start_index_rejects_bad_strength(schedule):
    sampler = make_sampler("ddim", schedule, 50)
    assert sampler.start_index(0.8) == 10  # docs/methods.md §5: 40 steps from t = 781
    assert int(sampler.timesteps[10]) == 781
    with pytest.raises(ValueError, match="strength"):
        sampler.start_index(1.5)
    with pytest.raises(ValueError, match="no step"):
        sampler.start_index(0.01)


def test_log_linear_sigma_grid_against_numpy(schedule):
    num_steps = 50
    timesteps, sigmas = log_linear_sigma_grid(schedule, num_steps)
    # independent numpy computation of k-diffusion DiscreteSchedule.t_to_sigma from the σ_t table
    # (the table itself, from float32 ᾱ_t, is checked against diffusers above)
    alphas_cumprod = schedule.alphas_cumprod.numpy().astype(np.float64)
    log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    t = np.linspace(999, 0, num_steps)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    expected = np.append(np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high]), 0.0)

    np.testing.assert_allclose(timesteps.numpy(), t, rtol=0, atol=1e-4)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-6)
    assert len(sigmas) == num_steps + 1 and sigmas[-1] == 0
    assert sigmas[0] == schedule.sigmas[999]  # σ_0 = σ at t = 999
    assert (sigmas[:-1].diff() < 0).all()
    # linear interpolation (diffusers) differs by more than the tolerance above (docs/methods.md §0.2)
    linear = np.interp(t, np.arange(1000), np.exp(log_sigmas))
    assert np.abs(linear / expected[:-1] - 1).max() > 1e-5


def test_euler_log_linear_loop_follows_kdiffusion_formula(schedule):
    num_steps = 15
    sampler = make_sampler("euler-a", schedule, num_steps, spacing="log-linear")
    assert sampler.init_noise_sigma == pytest.approx(float(sampler.sigmas[0]))
    x, _ = run_ours(sampler, seed=2)
    # k-diffusion sample_euler_ancestral with CompVisDenoiser (c_in = 1/√(σ²+1), c_out = −σ), written out
    _, sigmas = log_linear_sigma_grid(schedule, num_steps)
    timesteps = torch.linspace(999, 0, num_steps)
    generator = torch.Generator().manual_seed(2)
    ref = torch.randn(SHAPE, generator=generator) * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i].double(), sigmas[i + 1].double()
        denoised = ref - s * fake_model(ref / (s**2 + 1) ** 0.5, timesteps[i])
        s_up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        s_down = (s_next**2 - s_up**2) ** 0.5
        ref = ref + (ref - denoised) / s * (s_down - s)
        noise = torch.randn(SHAPE, generator=generator)
        ref = (ref + noise * s_up).float() if s_next > 0 else ref.float()
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_v_prediction_round_trip(schedule):
    gen = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    alpha_bar = schedule.alpha_bar(torch.tensor([901, 21]))  # per-sample ᾱ, shape [B]
    a = alpha_bar.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # v = √ᾱ ε − √(1−ᾱ) x0
    torch.testing.assert_close(velocity(eps, x0, alpha_bar), v)
    for prediction_type, output in [("v_prediction", v), ("epsilon", eps)]:
        eps_hat, x0_hat = predict_eps_x0(output, x_t, alpha_bar, prediction_type)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_value_errors(schedule):
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("k_dpm_fast", schedule)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("ddim", schedule, prediction_type="sample")
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("ddpm", schedule, num_steps=1001)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler-a", schedule, eta=1.0)
    with pytest.raises(ValueError, match="spacing"):
        make_sampler("ddim", schedule, spacing="log-linear")
    sampler = make_sampler("ddpm", schedule, 10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="Generator"):
        sampler.step(x, 0, x, generator=None)
    with pytest.raises(ValueError, match="step index"):
        sampler.step(x, 10, x, generator=torch.Generator())
    # DDIM with η = 0 is deterministic and needs no generator
    assert torch.isfinite(make_sampler("ddim", schedule, 10).step(x + 1, 0, x + 1)).all()
