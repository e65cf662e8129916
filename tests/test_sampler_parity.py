"""Every sampler against the diffusers scheduler of the same name, step by step, on recorded model outputs.

diffusers runs a deterministic stand-in model; its outputs are recorded and fed to editlab's sampler, which
must reproduce every intermediate sample, the model inputs (scale_model_input), the timesteps and the number
of noise draws (the generator ends in the same state). Cases: every sampler × ε/v × leading/linspace/trailing
× Karras on/off, wherever diffusers supports the combination and is right (see the sampler docstrings).
"""

import inspect

import pytest
import torch

from ldm.schedulers import SAMPLER_CLASSES, SAMPLERS, NoiseSchedule, make_sampler, resolve_sampler

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SD_FOLDER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
SHAPE = (2, 4, 8, 8)
STEPS = 10  # divides 1000: DDIM and PNDM step to the next grid point in diffusers too (see their docstrings)


def reference(name, prediction_type, spacing, karras, **extra):
    name, _ = resolve_sampler(name)
    config = dict(SD_FOLDER, prediction_type=prediction_type, timestep_spacing=spacing, **extra)
    if karras:
        config["use_karras_sigmas"] = True
    cls = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
           "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
           "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-sde": "DPMSolverMultistepScheduler",
           "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "plms": "PNDMScheduler"}[name]
    if name == "dpm++2m-sde":
        config["algorithm_type"] = "sde-dpmsolver++"
    return getattr(diffusers, cls).from_config(config)


def fake_model(x, t):
    """A deterministic stand-in for the UNet that depends on its input and the (real-valued) timestep."""
    return 0.1 * x + 0.05 * torch.sin(torch.as_tensor(t, dtype=torch.float32) / 50.0 + x)


def record(ref, steps, seed, eta=0.0):
    """Run diffusers; return (timesteps, model inputs, model outputs, samples, generator, init_noise_sigma)."""
    ref.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * ref.init_noise_sigma
    takes = inspect.signature(ref.step).parameters
    extra = {"generator": generator} if "generator" in takes else {}
    extra.update({"eta": eta} if "eta" in takes else {})
    inputs, outputs, samples = [], [], [x]
    for t in ref.timesteps:
        inputs.append(ref.scale_model_input(x, t))
        outputs.append(fake_model(inputs[-1], t))
        x = ref.step(outputs[-1], t, x, **extra).prev_sample
        samples.append(x)
    return ref.timesteps, inputs, outputs, samples, generator, float(ref.init_noise_sigma)


def close(a, b, rel=1e-6):
    """|a − b| ≤ 1e-6 · max(1, |b|max): fp32 keeps ~7 digits, so agreement is relative to the magnitude."""
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


def check_replay(sampler, recorded, seed):
    timesteps, inputs, outputs, samples, ref_generator, init_sigma = recorded
    assert len(sampler) == len(timesteps)
    torch.testing.assert_close(sampler.timesteps.double(), timesteps.double(), rtol=0, atol=1e-4)
    assert sampler.init_noise_sigma == pytest.approx(init_sigma, rel=1e-6)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * sampler.init_noise_sigma
    assert close(x, samples[0])
    for i in range(len(sampler)):
        assert close(sampler.scale_model_input(samples[i], i), inputs[i]), f"model input at step {i}"
        x = sampler.step(outputs[i], i, x, generator)
        assert close(x, samples[i + 1]), f"step {i}: {(x - samples[i + 1]).abs().max().item():.3g}"
    assert torch.isfinite(x).all() and x.abs().max() > 0.05
    assert torch.equal(generator.get_state(), ref_generator.get_state())  # the same noise draws


def _cases():
    for name in SAMPLERS:
        cls = SAMPLER_CLASSES[name]
        for spacing in ("leading", "linspace", "trailing"):
            if name == "plms" and spacing != "leading":
                continue  # plms has CompVis' own grid, equal to diffusers' leading one when N divides 1000
            if name in ("ddim", "pndm") and spacing == "linspace":
                continue  # diffusers steps off the grid there (t − T//N); tested below against the grid
            for karras in (False, True) if cls.karras else (False,):
                for prediction_type in ("epsilon", "v_prediction"):
                    if name == "plms" and prediction_type == "v_prediction":
                        continue  # CompVis converts each output to ε before combining; diffusers after
                    yield name, spacing, karras, prediction_type


@pytest.mark.parametrize("name,spacing,karras,prediction_type", list(_cases()))
def test_every_step_equals_diffusers(name, spacing, karras, prediction_type):
    recorded = record(reference(name, prediction_type, spacing, karras), STEPS, seed=3)
    sampler = make_sampler(name, NoiseSchedule.scaled_linear(), STEPS, prediction_type=prediction_type,
                           spacing=None if name == "plms" else spacing, karras=karras)
    check_replay(sampler, recorded, seed=3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_eta_draws_as_diffusers(eta):
    recorded = record(reference("ddim", "epsilon", "leading", False), 25, seed=1, eta=eta)
    check_replay(make_sampler("ddim", NoiseSchedule.scaled_linear(), 25, eta=eta), recorded, seed=1)


@pytest.mark.parametrize("name", ["ddim", "euler-a", "euler", "dpm++2m", "dpm++2m-sde", "unipc"])
def test_zero_terminal_snr_trailing_v_prediction(name):
    """Lin et al.'s recipe: rescaled betas, trailing grid, v-prediction."""
    recorded = record(reference(name, "v_prediction", "trailing", False, rescale_betas_zero_snr=True), STEPS, 4)
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1] == 0  # zero SNR at t = T−1
    check_replay(make_sampler(name, schedule, STEPS, prediction_type="v_prediction", spacing="trailing"),
                 recorded, seed=4)


@pytest.mark.parametrize("name", ["ddim", "pndm"])
def test_vp_samplers_step_to_the_next_grid_point(name):
    """linspace with N ∤ T: diffusers' t − T//N is off the grid; editlab's step lands on the grid point the next
    step evaluates, so its DDIM chain composes: the same x̂0 gives the next step's q-sample exactly."""
    schedule = NoiseSchedule.scaled_linear()
    sampler = make_sampler(name, schedule, 30, spacing="linspace")
    x0, eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), torch.randn(SHAPE)
    x = (schedule.alpha_bar(sampler.timesteps[0]) ** 0.5) * x0 + (1 - schedule.alpha_bar(sampler.timesteps[0])) ** 0.5 * eps
    step = 1 if name == "ddim" else 2  # pndm's 2nd evaluation is at the 1st grid point again
    x_next = sampler.step(eps, 0, x) if name == "ddim" else sampler.step(eps, 1, sampler.step(eps, 0, x))
    a = schedule.alpha_bar(sampler.timesteps[step])
    torch.testing.assert_close(x_next, a**0.5 * x0 + (1 - a) ** 0.5 * eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "dpm++2m", "unipc", "heun", "euler-a", "dpm++2m-sde"])  # lms: see below
@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_img2img_partial_run_equals_diffusers(name, strength):
    """diffusers img2img: begin at (N − ⌊N·strength⌋)·order, set_begin_index, add_noise at that step."""
    ref = reference(name, "epsilon", "linspace", False)
    ref.set_timesteps(STEPS)
    sampler = make_sampler(name, NoiseSchedule.scaled_linear(), STEPS)
    begin = sampler.start_index(strength)
    assert begin == (STEPS - int(STEPS * strength)) * ref.order
    ref.set_begin_index(begin)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    ref_x = ref.add_noise(x0, noise, ref.timesteps[begin:begin + 1])
    x = sampler.add_noise(x0, noise, begin)
    assert close(x, ref_x)
    g_ref, g = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    extra = {"generator": g_ref} if "generator" in inspect.signature(ref.step).parameters else {}
    for i in range(begin, len(sampler)):
        t = ref.timesteps[i]
        out = fake_model(ref.scale_model_input(ref_x, t), t)
        ref_x = ref.step(out, t, ref_x, **extra).prev_sample
        x = sampler.step(out, i, x, g)
        assert close(x, ref_x), f"step {i}"


def test_lms_warms_up_when_started_part_way():
    """diffusers' LMS uses order min(step index + 1, 4) even when img2img starts at step 5; editlab counts the
    derivatives it holds, so its first step from a part-way start is the Euler step."""
    schedule = NoiseSchedule.scaled_linear()
    lms, euler = make_sampler("lms", schedule, STEPS), make_sampler("euler", schedule, STEPS)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(lms.step(out, 5, x), euler.step(out, 5, x), rtol=1e-6, atol=1e-6)


def test_pndm_started_part_way_runs_every_grid_interval():
    schedule = NoiseSchedule.scaled_linear()
    sampler = make_sampler("pndm", schedule, STEPS)
    begin = sampler.start_index(0.5)
    assert begin == 5 and sampler.timesteps[begin:].tolist() == [401, 301, 301, 201, 101, 1]  # 5 intervals


def test_aliases_and_refusals():
    schedule = NoiseSchedule.scaled_linear()
    assert resolve_sampler("DPM++ 2M Karras") == ("dpm++2m", True)
    assert resolve_sampler("euler a") == ("euler-a", False)
    sampler = make_sampler("DPM++ 2M Karras", schedule, 10)
    assert sampler.name == "dpm++2m" and sampler.sigmas[0] == pytest.approx(14.6146, abs=1e-4)
    with pytest.raises(ValueError, match="Karras σ works with euler, heun, lms, dpm"):
        make_sampler("euler-a", schedule, 10, karras=True)
    with pytest.raises(ValueError, match="plms supports spacing leading"):
        make_sampler("plms", schedule, 10, spacing="trailing")
    with pytest.raises(ValueError, match="zero-terminal-SNR.*use one of ddim"):
        make_sampler("heun", NoiseSchedule.scaled_linear(zero_terminal_snr=True), 10)
    with pytest.raises(ValueError, match="unknown sampler 'k_dpm'"):
        make_sampler("k_dpm", schedule)
