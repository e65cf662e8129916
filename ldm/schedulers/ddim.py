"""DDIM sampler with η, on the "leading" grid of Stable Diffusion.

Paper: *Denoising Diffusion Implicit Models* (Song, Meng & Ermon, 2021).
- eq. 12: x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε̂ + σ_t z,   x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t
- eq. 16: σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev);  η = 0 is deterministic DDIM, η = 1 is DDPM-like.

SD conventions (diffusers DDIMScheduler with the SD config, docs/methods.md §0.2-0.3): grid t_k = k·(1000//N)+1,
previous timestep p = t − 1000//N, ᾱ_p = ᾱ_0 when p < 0 ("final alpha"), no clipping of x̂0. z is drawn on every
step when η > 0 and never when η = 0, so a seeded generator gives the same images as diffusers.
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule, Sampler, gaussian_noise, leading_timesteps, predict_eps_x0


def ddim_sigma(
    alpha_bar_t: float | torch.Tensor, alpha_bar_prev: float | torch.Tensor, eta: float
) -> float | torch.Tensor:
    """σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t) · (1−ᾱ_t/ᾱ_prev))   (DDIM eq. 16).

    At η = 1 this is the DDPM posterior std, the σ_t of edit-friendly DDPM inversion (docs/methods.md §4.1)."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    return eta * variance**0.5


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    sigma: float | torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z   (DDIM eq. 12); noise=None drops the σ z term."""
    direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
    x_prev = alpha_bar_prev**0.5 * x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        spacing: str = "leading",
        steps_offset: int = 1,
    ):
        super().__init__(schedule, num_steps, prediction_type)
        if spacing != "leading":
            raise ValueError(f"ddim supports spacing 'leading' only, got {spacing!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        self.eta = eta
        self.step_ratio = schedule.num_train_timesteps // num_steps
        self.timesteps = leading_timesteps(num_steps, steps_offset, schedule.num_train_timesteps)

    def previous_timestep(self, i: int) -> int:
        """p = t_i − 1000//N; negative on the last step, where ᾱ_p = ᾱ_0."""
        return int(self.timesteps[i]) - self.step_ratio

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self._check_index(i)
        alpha_bar_t = self.schedule.alpha_bar(self.timesteps[i])
        alpha_bar_prev = self.schedule.alpha_bar(self.previous_timestep(i))
        eps, x0 = predict_eps_x0(model_output, x, alpha_bar_t, self.prediction_type)
        sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, self.eta)
        noise = None
        if self.eta > 0:
            noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        return ddim_step(x0, eps, alpha_bar_prev, sigma, noise)
