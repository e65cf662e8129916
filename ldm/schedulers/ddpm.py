"""Ancestral DDPM sampler on a strided grid.

Paper: *Denoising Diffusion Probabilistic Models* (Ho, Jain & Abbeel, 2020), eq. 6-7: the posterior
q(x_prev | x_t, x0) = N(μ̃, β̃ I) with

    μ̃ = √ᾱ_prev β_t / (1−ᾱ_t) · x0 + √α_t (1−ᾱ_prev) / (1−ᾱ_t) · x_t      (eq. 7)
    β̃ = (1−ᾱ_prev) / (1−ᾱ_t) · β_t                                        ("fixed_small" variance)

On a grid that skips steps, α_t and β_t are those of the whole jump: α_t = ᾱ_t/ᾱ_prev, β_t = 1 − α_t.
x̂0 from the model replaces x0; the sample is x_prev = μ̃ + √β̃ z.

SD conventions (diffusers DDPMScheduler, variance_type "fixed_small", clip_sample False):
- grid ("leading": t_k = k·(1000//N)+1); the previous timestep is the next grid entry, and after the last one ᾱ_prev = 1
  (not ᾱ_0 as in DDIM), so the last step returns x̂0's posterior mean with zero variance;
- β̃ is clamped to ≥ 1e-20, and z is drawn on every step with t > 0 (also the last step of the offset-1 grid,
  where √β̃ = 1e-10), so a seeded generator advances exactly as in diffusers.
"""

from __future__ import annotations

import torch

from .base import Sampler
from .grids import spaced_timesteps
from .schedule import NoiseSchedule, gaussian_noise, predict_eps_x0


def ddpm_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃ and variance β̃ of q(x_prev | x_t, x0) for a jump t → prev (DDPM eq. 6-7)."""
    alpha_t = alpha_bar_t / alpha_bar_prev  # α_t of the whole jump
    beta_t = 1 - alpha_t
    x0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
    xt_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    mean = x0_coeff * x0 + xt_coeff * x_t
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean, variance


class DDPMSampler(Sampler):
    name = "ddpm"
    zero_snr = True
    stochastic = True
    default_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        prediction_type: str = "epsilon",
        spacing: str = "leading",
        steps_offset: int = 1,
    ):
        super().__init__(schedule, num_steps, prediction_type)
        self.spacing = spacing
        grid = spaced_timesteps(spacing, num_steps, schedule.num_train_timesteps, steps_offset, "vp")
        self.timesteps = torch.from_numpy(grid)

    def alpha_bar_prev(self, i: int) -> torch.Tensor:
        """ᾱ of the next grid timestep; 1 after the last step (the chain ends at clean data)."""
        if i + 1 < self.num_steps:
            return self.schedule.alpha_bar(self.timesteps[i + 1])
        return torch.tensor(1.0)

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._begin_step(i)
        alpha_bar_t = self.schedule.alpha_bar(self.timesteps[i])
        alpha_bar_prev = self.alpha_bar_prev(i)
        _, x0 = predict_eps_x0(model_output, x, alpha_bar_t, self.prediction_type)
        mean, variance = ddpm_posterior(x0, x, alpha_bar_t, alpha_bar_prev)
        if self.timesteps[i] <= 0:  # the chain is at t = 0: nothing to add
            return mean
        noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        return mean + variance.clamp(min=1e-20) ** 0.5 * noise
