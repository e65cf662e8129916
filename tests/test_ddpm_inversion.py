"""Edit-friendly DDPM inversion (inversion/ddpm_noise.py): exact reconstruction (last step included), the
auxiliary path, agreement with diffusers' LEDITS++ ``invert``, and the noise statistics of Sec. 2.2."""

import dataclasses
import os

import pytest
import torch
from torch import nn

from editing.ddpm_edit.noise_space import noise_statistics
from inversion.ddim_inversion import inversion_sampler
from inversion.ddpm_noise import (DDPMInversion, DDPMInversionConfig, auxiliary_path, edit_friendly_sampler, extract_noise_maps,
                                  invert, regenerate, sample_native)
from ldm.config import ModelConfig, sd15, tiny_sd1, tiny_sd2
from ldm.hooks import StepHook
from ldm.model import StableDiffusion
from ldm.pipeline import encode_images, guided_unet, text_context
from ldm.schedulers import NoiseSchedule, ddim_sigma
from ldm.unet import UNet
from tests.peers import randomize_

PROMPT = "a red circle on a blue background"


def _model(cfg: ModelConfig, seed: int = 3) -> StableDiffusion:
    return randomize_(StableDiffusion(cfg), seed).eval()


@pytest.fixture(scope="module")
def sd1():
    return _model(tiny_sd1())


def _image(side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


class Recorder(StepHook):
    """Step hook keeping every latent the sampler produces."""

    def __init__(self):
        self.latents = []

    def end_step(self, i, t, latents):
        self.latents.append(latents.clone())
        return latents


def _reconstruct(predict, inversion):
    recorder = Recorder()
    final = regenerate(predict, inversion, hooks=[recorder])
    return final, torch.stack(recorder.latents)


@pytest.mark.parametrize("eta,steps", [(1.0, 10), (0.5, 10), (1.0, 25), (0.5, 4)])
def test_reconstruction_is_exact(sd1, eta, steps):
    x0 = encode_images(sd1, _image())
    x0_before = x0.clone()
    inversion = invert(sd1, x0, PROMPT, DDPMInversionConfig(steps=steps, eta=eta), torch.Generator().manual_seed(0))
    assert torch.equal(x0, x0_before)  # the caller's latents are untouched
    assert inversion.latents.shape == (steps + 1, *x0.shape) and inversion.noise_maps.shape == (steps, *x0.shape)
    assert inversion.noise_maps[-1].abs().mean() > 0.1  # the last map is kept (the public code zeroes it)
    predict = guided_unet(sd1.unet, text_context(sd1, [PROMPT], None, 3.5), 3.5)
    final, path = _reconstruct(predict, inversion)
    assert (final - x0).abs().max() <= 1e-5
    assert (path - inversion.latents[1:]).abs().max() <= 1e-5  # every intermediate latent, not only x0


def test_the_inversion_follows_the_models_own_noise_schedule():
    """A model trained on other betas (its scheduler config, kept in the weights' metadata) is inverted, and
    regenerated, on those betas: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with its ᾱ_t, not SD's."""
    model = _model(tiny_sd1())
    model.scheduler_config = {**model.scheduler_config, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    x0 = encode_images(model, _image())
    inversion = invert(model, x0, PROMPT, DDPMInversionConfig(steps=6), torch.Generator().manual_seed(0))
    linear = torch.linspace(1e-4, 0.02, 1000).double()
    assert torch.allclose(inversion.schedule.alphas_cumprod.double(), torch.cumprod(1 - linear, 0), rtol=1e-5)
    assert inversion.schedule.alpha_bar(981) < 0.5 * NoiseSchedule.scaled_linear().alpha_bar(981)  # really other
    predict = guided_unet(model.unet, text_context(model, [PROMPT], None, 3.5), 3.5)
    assert (regenerate(predict, inversion) - x0).abs().max() <= 1e-5  # float32 rounding of 6 steps
    pivots = inversion_sampler(model, 4).schedule.alphas_cumprod
    assert torch.equal(pivots, inversion.schedule.alphas_cumprod)  # DDIM inversion reads the same schedule


def test_reconstruction_v_prediction():
    model = _model(tiny_sd2())
    x0 = encode_images(model, _image())
    inversion = invert(model, x0, PROMPT, DDPMInversionConfig(steps=6), torch.Generator().manual_seed(0))
    assert inversion.prediction_type == "v_prediction"
    predict = guided_unet(model.unet, text_context(model, [PROMPT], None, 3.5), 3.5)
    assert (regenerate(predict, inversion) - x0).abs().max() <= 1e-5


def test_zeroing_the_last_noise_map_breaks_reconstruction(sd1):
    """docs/methods.md §4.3 item 1: inbarhub/DDPM_inversion sets z_1 = 0; then x_1 -> x0 misses exactly σ_1·z_1."""
    x0 = encode_images(sd1, _image())
    inversion = invert(sd1, x0, PROMPT, DDPMInversionConfig(steps=5), torch.Generator().manual_seed(0))
    zeroed = inversion.noise_maps.clone()
    zeroed[-1] = 0
    predict = guided_unet(sd1.unet, text_context(sd1, [PROMPT], None, 3.5), 3.5)
    error = (regenerate(predict, dataclasses.replace(inversion, noise_maps=zeroed)) - x0).abs().max()
    sigma_1 = ddim_sigma(_alpha_bar(1), _alpha_bar(-1), 1.0)  # t = 1 -> ᾱ_0
    assert error == pytest.approx(float(sigma_1 * inversion.noise_maps[-1].abs().max()), rel=1e-3)
    assert error > 1e-3


def _alpha_bar(t: int) -> torch.Tensor:
    return edit_friendly_sampler(10, 1.0).schedule.alpha_bar(t)


def test_auxiliary_path_draws_independent_noise_smallest_t_first():
    sampler = edit_friendly_sampler(5, 1.0)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    path = auxiliary_path(x0, sampler, torch.Generator().manual_seed(0))
    draws = torch.randn(5, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # t = 1, 201, ..., 801
    assert sampler.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert torch.equal(path[-1], x0)
    for i, t in enumerate(sampler.timesteps.tolist()):
        a = float(_alpha_bar(t))
        expected = a ** 0.5 * x0 + (1 - a) ** 0.5 * draws[4 - i]  # x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε̃_t
        assert (path[i] - expected).abs().max() <= 1e-5
    # one generator per batch item: item k does not depend on the batch
    single = auxiliary_path(x0[1:], sampler, [torch.Generator().manual_seed(9)])
    pair = auxiliary_path(x0, sampler, [torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)])
    assert torch.equal(single[:, 0], pair[:, 1])


def test_bad_inputs_are_one_line_errors(sd1):
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDPMInversionConfig(eta=0.0)
    x0 = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match="source prompts"):
        invert(sd1, x0, ["a", "b", "c"], DDPMInversionConfig(steps=2), torch.Generator())
    sampler = edit_friendly_sampler(4, 1.0)
    with pytest.raises(ValueError, match="needs 5"):
        extract_noise_maps(lambda x, i, t: x, sampler, torch.zeros(3, 1, 4, 8, 8))


class StandIn(nn.Module):
    """A cheap prompt- and time-dependent ε predictor with the UNet's call signature (x, t, context)."""

    def __init__(self):
        super().__init__()
        self.conv = randomize_(nn.Conv2d(4, 4, 3, padding=1), 0)

    def forward(self, x, t, context):
        text = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # one number per row, [2B, 77, C] -> [2B, 1, 1, 1]
        return torch.tanh(self.conv(x)) + text * (1 + t / 1000)


@pytest.mark.parametrize("eta,steps", [(1.0, 100), (0.5, 50)])
def test_sd15_shaped_reconstruction(eta, steps):
    """SD 1.5 shapes and grids at low cost: a 64×64×4 latent (512² images) with SD's spread, 768-wide
    contexts, the full 100- and 50-step grids (σ down to 0.02), with a cheap stand-in for the UNet. The real
    UNet at these shapes is ``test_sd15_unet_reconstruction`` (opt-in)."""
    _check_reconstruction(StandIn(), eta, steps)


def _check_reconstruction(unet, eta: float, steps: int) -> None:
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))  # [uncond; cond]
    x0 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    sampler = edit_friendly_sampler(steps, eta)
    predict = guided_unet(unet, context, 3.5)
    with torch.no_grad():
        path = auxiliary_path(x0, sampler, torch.Generator().manual_seed(3))
        latents, noise_maps = extract_noise_maps(predict, sampler, path)
    inversion = DDPMInversion(latents, noise_maps, sampler.timesteps, eta)
    assert (regenerate(predict, inversion) - x0).abs().max() <= 1e-5


@pytest.mark.full_size
@pytest.mark.skipif(os.environ.get("EDITLAB_SLOW") != "1", reason="the real SD 1.5 UNet (3.4 GB fp32) takes ~4 min "
                    "on a shared 2-core CPU; run with EDITLAB_SLOW=1")
def test_sd15_unet_reconstruction():
    """The real SD 1.5 UNet (random weights) on a 64×64 latent, 2 steps."""
    with torch.device("meta"):
        unet = UNet(sd15().unet)
    _check_reconstruction(randomize_(unet.to_empty(device="cpu"), 0).eval(), 1.0, 2)


def test_edit_friendly_maps_have_higher_variance_and_negative_correlation(sd1):
    """Sec. 2.2 of the paper, on the tiny model: native maps ~ N(0, I) (variance 1, uncorrelated); the
    edit-friendly maps of the image the native run produced have variance > 1 and corr(z_t, z_t−1) < 0."""
    cfg = DDPMInversionConfig(steps=10)
    generator = torch.Generator().manual_seed(0)
    native = sample_native(sd1, [PROMPT], (16, 16), cfg, generator)
    friendly = invert(sd1, native.latents[-1], PROMPT, cfg, generator)
    native_var, native_corr = noise_statistics(native.noise_maps)
    friendly_var, friendly_corr = noise_statistics(friendly.noise_maps)
    assert (native_var - 1).abs().max() < 0.2 and native_corr.abs().max() < 0.1
    assert (friendly_var > 1.5 * native_var).all()
    # every consecutive pair but the last (t = 11 -> 1, where this untrained model's ε̂ decides the sign)
    assert (friendly_corr[:-1] < -0.1).all()


# --- agreement with diffusers' LEDITS++ inversion (docs/methods.md §4.2) ----------------------------------------


def _ledits_pipeline(model):
    """diffusers' LEditsPPPipelineStableDiffusion on ``model``'s weights with SD's DDIM scheduler, plus a spy on
    its noise computation (to read the corrected latents, which ``invert`` keeps only for the last step)."""
    from diffusers import LEditsPPPipelineStableDiffusion
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as ledits

    from editing.bench.peers import diffusers_components, diffusers_scheduler

    unet, vae, text, tokenizer = diffusers_components(model)
    scheduler = diffusers_scheduler("ddim", model.config.prediction_type)
    add_noise = scheduler.add_noise  # diffusers 0.42 passes float timesteps (torch.Tensor([t])) -> IndexError
    scheduler.add_noise = lambda x, noise, t: add_noise(x, noise, t.long())
    pipe = LEditsPPPipelineStableDiffusion(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    corrected = []

    def spy(*args):
        z, x_prev = compute_noise(*args)
        corrected.append(x_prev.clone())
        return z, x_prev

    compute_noise = ledits.compute_noise
    return pipe, corrected, (ledits, "compute_noise", spy)


def _ledits_invert(monkeypatch, model, image, source_prompt, steps, seed):
    pipe, corrected, patch = _ledits_pipeline(model)
    monkeypatch.setattr(*patch)
    # skip=0: LEDITS++ otherwise builds a grid of ⌊N·(1+skip)⌋ steps and inverts only its last N
    pipe.invert(image, source_prompt=source_prompt, source_guidance_scale=3.5, num_inversion_steps=steps, skip=0.0,
                generator=torch.Generator().manual_seed(seed))
    return pipe, torch.stack(corrected)


STEPS_PEER = 10


def test_matches_diffusers_ledits_pp_inversion(sd1, monkeypatch):
    """Same weights, image, grid (leading, offset 1, skip 0), η = 1 (LEDITS++ forces it), mode encoding and
    random draws (one generator; noise drawn for the smallest t first in both): the same noise maps and
    latents. LEDITS++ runs ε̂ = ε_u alone for its default empty source prompt; editlab runs CFG on a batch
    [∅; ∅], equal up to rounding. z = (x_p − μ)/σ divides UNet rounding differences (~1e-6) by σ (0.02 at the
    last step), so the maps are compared relative to their size (|z| reaches ~50 with random weights)."""
    image = _image()
    pipe, theirs = _ledits_invert(monkeypatch, sd1, image, "", STEPS_PEER, seed=0)
    x0 = encode_images(sd1, image)
    ours = invert(sd1, x0, "", DDPMInversionConfig(steps=STEPS_PEER), torch.Generator().manual_seed(0))
    assert pipe.inversion_steps.tolist() == ours.timesteps.tolist() == list(range(901, 0, -100))
    assert (pipe.init_latents - ours.latents[0]).abs().max() <= 1e-5  # x_T: same draw, same formula
    assert (theirs - ours.latents[1:]).abs().max() <= 1e-4  # the rewritten latents x_p = μ + σ z
    assert (pipe.zs - ours.noise_maps).abs().max() <= 1e-5 * ours.noise_maps.abs().max()


def test_ledits_pp_guides_away_from_a_source_prompt(sd1, monkeypatch):
    """diffusers 0.42 LEDITS++ ``invert`` unpacks ``encode_prompt``'s (prompt, negative) embeddings as
    (uncond, cond): with a source prompt it computes ε̂ = ε_src + w(ε_∅ − ε_src), guidance *away* from the
    prompt. editlab uses ε̂ = ε_∅ + w(ε_src − ε_∅); with the two contexts swapped, the maps agree."""
    image = _image()
    pipe, theirs = _ledits_invert(monkeypatch, sd1, image, PROMPT, STEPS_PEER, seed=4)
    x0 = encode_images(sd1, image)
    ours = invert(sd1, x0, PROMPT, DDPMInversionConfig(steps=STEPS_PEER), torch.Generator().manual_seed(4))
    assert (pipe.zs - ours.noise_maps).abs().max() > 1e-2 * ours.noise_maps.abs().max()  # the conventions differ

    uncond, cond = text_context(sd1, [PROMPT], None, 3.5).chunk(2)
    swapped = guided_unet(sd1.unet, torch.cat([cond, uncond]), 3.5)
    sampler = edit_friendly_sampler(STEPS_PEER, 1.0)
    with torch.no_grad():
        latents, noise_maps = extract_noise_maps(swapped, sampler,
                                                 auxiliary_path(x0, sampler, torch.Generator().manual_seed(4)))
    assert (theirs - latents[1:]).abs().max() <= 1e-4
    assert (pipe.zs - noise_maps).abs().max() <= 1e-5 * noise_maps.abs().max()
