"""Euler and Euler ancestral samplers in the σ view.

Paper: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022), and
k-diffusion's `sample_euler` / `sample_euler_ancestral`. With x = x0 + σ ε and D = x̂0 (``SigmaSampler.denoised``)
the probability-flow ODE is dx/dσ = (x − D)/σ (Karras eq. 3 for σ(t) = t):

    Euler (Algorithm 2 without churn):  x' = x + (σ' − σ)·(x − D)/σ
    Euler ancestral (η = 1):            σ_up = √(σ'² (σ² − σ'²) / σ²),  σ_down = √(σ'² − σ_up²)
                                        x' = x + (σ_down − σ)·(x − D)/σ + σ_up z

σ' is the next σ of the grid, 0 after the last step. Both compute in float32 and return the model's dtype.
Euler draws no noise (diffusers ≥ 0.31 draws none either when churn is 0). Euler ancestral draws z on every
step, also the last (σ' = 0, σ_up = 0), so a seeded generator advances exactly as in diffusers; σ_up ≤ σ' always
holds, so k-diffusion's min(σ', ·) is not needed.

Grids: "linspace" (diffusers' default), "leading", "trailing", optional Karras σ for Euler (diffusers'
EulerAncestralDiscreteScheduler has none), and for Euler ancestral also "log-linear" (k-diffusion's grid,
interpolating log σ, used by InstructPix2Pix). The timesteps given to the UNet are real-valued.
"""

from __future__ import annotations

import torch

from .base import SigmaSampler
from .grids import SPACINGS, log_linear_timesteps, sampler_sigmas, sigma_grid
from .schedule import NoiseSchedule, gaussian_noise

EULER_SPACINGS = SPACINGS + ("log-linear",)


class EulerSampler(SigmaSampler):
    name = "euler"
    karras = True
    zero_snr = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1, karras: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        self._set_grid(*sampler_sigmas(schedule, spacing, num_steps, steps_offset, karras, "sigma"), spacing)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._begin_step(i)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        derivative = (x - self.denoised(model_output, x, sigma)) / sigma  # dx/dσ
        return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestralSampler(SigmaSampler):
    name = "euler-a"
    zero_snr = True
    stochastic = True
    spacings = EULER_SPACINGS

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1):
        super().__init__(schedule, num_steps, prediction_type)
        if spacing == "log-linear":
            timesteps = log_linear_timesteps(num_steps, schedule.num_train_timesteps)
            grid = timesteps, sigma_grid(schedule, timesteps, log_linear=True)
        elif spacing in SPACINGS:
            grid = sampler_sigmas(schedule, spacing, num_steps, steps_offset, False, "sigma")
        else:
            raise ValueError(f"euler-a spacing must be one of {EULER_SPACINGS}, got {spacing!r}")
        self._set_grid(*grid, spacing)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._begin_step(i)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = self.denoised(model_output, x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - denoised) / sigma  # dx/dσ of the probability-flow ODE
        x_next = x + derivative * (sigma_down - sigma)
        noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        return (x_next + noise * sigma_up).to(model_output.dtype)
