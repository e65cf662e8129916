"""DDIM inversion: the step inverts DDIM's, the pivots walk the sampler's grid backwards (ε and v models
alike), a w = 1 round trip reconstructs, and stochastic samplers are refused."""

import pytest
import torch
from torch import nn

from inversion.ddim_inversion import ddim_invert, ddim_inversion_step, ddim_reconstruct, inversion_sampler
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule

SCHEDULE = NoiseSchedule.scaled_linear()


def test_inversion_step_undoes_a_ddim_step():
    z_c, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a_c, a_n = SCHEDULE.alpha_bar(241), SCHEDULE.alpha_bar(261)
    z_n = ddim_inversion_step(eps, z_c, a_c, a_n)
    x0 = (z_n - (1 - a_n) ** 0.5 * eps) / a_n**0.5  # DDIM η = 0 from n back to c with the same ε
    assert torch.allclose(a_c**0.5 * x0 + (1 - a_c) ** 0.5 * eps, z_c, atol=1e-5)


class ZeroNoise(nn.Module):
    """A UNet stand-in that predicts ε = 0 (as ε, or as the matching v) and records its timesteps."""

    def __init__(self, prediction_type):
        super().__init__()
        self.prediction_type, self.timesteps = prediction_type, []
        self.conv_in = nn.Conv2d(1, 1, 1)  # where StableDiffusion.device looks

    def forward(self, x, t, context):
        self.timesteps.append(int(t))
        if self.prediction_type == "epsilon":
            return torch.zeros_like(x)
        alpha_bar = SCHEDULE.alpha_bar(t)
        return -((1 - alpha_bar) / alpha_bar) ** 0.5 * x  # v = √ᾱ·0 − √(1−ᾱ)·x0 with x0 = x/√ᾱ


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pivots_walk_the_sampling_grid_backwards(prediction_type):
    model = StableDiffusion(tiny_sd1().replace(prediction_type=prediction_type))
    model.unet = ZeroNoise(prediction_type)
    sampler = inversion_sampler(model, 5)
    assert sampler.timesteps.tolist() == [801, 601, 401, 201, 1]
    z0 = torch.randn(1, 4, 8, 8)
    original = z0.clone()
    pivots = ddim_invert(model, z0, "a cat", sampler, guidance=1.0)
    assert model.unet.timesteps == [1, 201, 401, 601, 801]  # ε(z_c, n): the next timestep
    assert len(pivots) == 6 and pivots[0] is z0 and torch.equal(z0, original)
    for k, t in enumerate([1, 201, 401, 601, 801], start=1):  # ε = 0: z_n = √(ᾱ_n/ᾱ_c)·z_c from ᾱ_0 on
        expected = z0 * (SCHEDULE.alpha_bar(t) / SCHEDULE.alpha_bar(0)) ** 0.5
        assert torch.allclose(pivots[k], expected, rtol=1e-5, atol=1e-6), k


@pytest.fixture(scope="module")
def smooth_model():
    """tiny_sd1 with its output layer scaled by 0.1: ε̂ small and smooth in x, as a trained denoiser's is,
    so DDIM's linearisation (ε at the current latent, next timestep) holds."""
    torch.manual_seed(0)
    model = StableDiffusion(tiny_sd1()).eval()
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(0.1)
        model.unet.conv_out.bias.mul_(0.1)
    return model


def test_round_trip_at_guidance_one_reconstructs(smooth_model):
    sampler = inversion_sampler(smooth_model, 5)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pivots = ddim_invert(smooth_model, z0, "a cat on a mat", sampler, guidance=1.0)
    back = ddim_reconstruct(smooth_model, pivots[-1], "a cat on a mat", sampler, guidance=1.0)
    error = (back - z0).pow(2).mean().item()
    assert error < 5e-3  # measured 1.3e-3 (5 steps; 50 steps do better), against a latent variance of 1
    assert (pivots[-1] - z0).pow(2).mean() > 0.5  # the last pivot is noise-like, far from z0


def test_inversion_refuses_stochastic_samplers(smooth_model):
    z0 = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        ddim_invert(smooth_model, z0, "a cat", DDPMSampler(SCHEDULE, 5))
    with pytest.raises(ValueError, match="eta 0.5"):
        ddim_invert(smooth_model, z0, "a cat", DDIMSampler(SCHEDULE, 5, eta=0.5))
    with pytest.raises(ValueError, match=r"one latent \[1, C, h, w\]"):
        ddim_invert(smooth_model, torch.zeros(2, 4, 8, 8), "a cat", inversion_sampler(smooth_model, 5))
