"""Euler ancestral sampler (η = 1) in the σ parameterisation.

Papers and code: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022) for
the σ view of a VP model, and k-diffusion `sample_euler_ancestral` for the ancestral step (docs/methods.md §0.3):

    x_σ = x_VP·√(σ²+1),  UNet input c_in·x with c_in = 1/√(σ²+1),  D = x − σ ε̂      (denoised estimate)
    σ_up   = √(σ'² (σ² − σ'²) / σ²),   σ_down = √(σ'² − σ_up²)                        (σ' = next σ)
    x ← x + (σ_down − σ)·(x − D)/σ + σ_up z,                start x = init_noise_sigma·z

σ_up ≤ σ' always holds here, so k-diffusion's min(σ', ·) is not needed. Like diffusers, z is drawn on every step,
also the last (σ' = 0, σ_up = 0), so a seeded generator advances exactly as in diffusers.

Grids (docs/methods.md §0.2): "linspace" (diffusers default, used for parity tests), "leading" (t_k = k·(1000//N)+1;
diffusers then starts from √(σ_0²+1)·z instead of σ_0·z) and "log-linear" (k-diffusion, InstructPix2Pix).
The timesteps given to the UNet are real-valued.
"""

from __future__ import annotations

import torch

from .schedule import (
    NoiseSchedule,
    Sampler,
    gaussian_noise,
    leading_timesteps,
    linspace_timesteps,
    log_linear_timesteps,
    predict_eps_x0,
    sigma_grid,
)

EULER_SPACINGS = ("linspace", "leading", "log-linear")


class EulerAncestralSampler(Sampler):
    name = "euler-a"

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        prediction_type: str = "epsilon",
        spacing: str = "linspace",
    ):
        super().__init__(schedule, num_steps, prediction_type)
        num_train = schedule.num_train_timesteps
        if spacing == "linspace":
            self.timesteps = linspace_timesteps(num_steps, num_train)
        elif spacing == "leading":
            self.timesteps = leading_timesteps(num_steps, 1, num_train).float()
        elif spacing == "log-linear":
            self.timesteps = log_linear_timesteps(num_steps, num_train)
        else:
            raise ValueError(f"euler-a spacing must be one of {EULER_SPACINGS}, got {spacing!r}")
        self.spacing = spacing
        self.sigmas = sigma_grid(schedule, self.timesteps, log_linear=spacing == "log-linear")  # [N+1], ends in 0
        sigma_max = self.sigmas[0]
        # diffusers starts the "leading" grid from √(σ_max²+1)·z, the others from σ_max·z
        self.init_noise_sigma = float((sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """c_in·x with c_in = 1/√(σ_i²+1): the UNet expects VP-scaled input."""
        self._check_index(i)
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_σ = x0 + σ_i z (the σ-scaled counterpart of √ᾱ x0 + √(1−ᾱ) z)."""
        self._check_index(i)
        return x0 + self.sigmas[i].to(x0.device, x0.dtype) * noise

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._check_index(i)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        # the UNet saw x_VP = c_in·x at ᾱ = 1/(σ²+1); convert its output to ε̂, then D = x − σ ε̂
        alpha_bar = 1 / (sigma**2 + 1)
        eps, _ = predict_eps_x0(model_output, x * alpha_bar**0.5, alpha_bar, self.prediction_type)
        denoised = x - sigma * eps
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - denoised) / sigma  # dx/dσ of the probability-flow ODE
        x_next = x + derivative * (sigma_down - sigma)
        noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        x_next = x_next + noise * sigma_up
        return x_next.to(model_output.dtype)
