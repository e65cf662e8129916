"""DDIM sampler with η.

Paper: *Denoising Diffusion Implicit Models* (Song, Meng & Ermon, 2021).
- eq. 12: x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε̂ + σ_t z,   x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t
- eq. 16: σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev);  η = 0 is deterministic DDIM, η = 1 is DDPM-like.

``step_mean`` returns the deterministic part μ = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε̂ and σ_t, and ``step`` takes an
explicit z, so that edit-friendly DDPM inversion (which solves x_prev = μ + σ_t z for z) runs this sampler's
own arithmetic.

SD conventions (diffusers DDIMScheduler with the SD config): the "leading" grid t_k = k·(T//N)+1, the previous
timestep is the next grid point, and past the last one ᾱ_prev = ᾱ_0 (the config's set_alpha_to_one=False;
1 when it is true). No clipping of x̂0. z is drawn on every step when η > 0 and never when η = 0, so a seeded
generator gives the same images as diffusers.

Correct where diffusers is not: diffusers takes the previous timestep as t − T//N whatever the spacing, which
on "linspace" and "trailing" grids with T mod N ≠ 0 lands next to the grid point the next step evaluates
(N = 30 trailing: 933 instead of 932). editlab steps to the next grid point; both agree on "leading" grids and
on "trailing" grids with N dividing T.
"""

from __future__ import annotations

import torch

from .base import Sampler
from .grids import spaced_timesteps
from .schedule import NoiseSchedule, gaussian_noise, predict_eps_x0


def ddim_sigma(
    alpha_bar_t: float | torch.Tensor, alpha_bar_prev: float | torch.Tensor, eta: float
) -> float | torch.Tensor:
    """σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t) · (1−ᾱ_t/ᾱ_prev))   (DDIM eq. 16).

    At η = 1 this is the DDPM posterior std, the σ_t of edit-friendly DDPM inversion."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    return eta * variance**0.5


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: float | torch.Tensor,
                sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
    """μ = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂: the deterministic part of DDIM eq. 12 (the whole step at η = 0;
    DDIM inversion runs it towards a larger t)."""
    direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
    return alpha_bar_prev**0.5 * x0 + direction


class DDIMSampler(Sampler):
    name = "ddim"
    zero_snr = True
    default_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        spacing: str = "leading",
        steps_offset: int = 1,
        final_alpha_one: bool = False,
    ):
        super().__init__(schedule, num_steps, prediction_type)
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        self.eta = eta
        self.stochastic = eta > 0
        self.spacing = spacing
        self.final_alpha_one = final_alpha_one
        grid = spaced_timesteps(spacing, num_steps, schedule.num_train_timesteps, steps_offset, "vp")
        self.timesteps = torch.from_numpy(grid)

    def previous_timestep(self, i: int) -> int:
        """The next grid timestep; −1 after the last one."""
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def alpha_bar_prev(self, i: int) -> torch.Tensor:
        """ᾱ at the next grid timestep; past the end ᾱ_0 (or 1 with set_alpha_to_one)."""
        if i + 1 == len(self.timesteps) and self.final_alpha_one:
            return torch.tensor(1.0)
        return self.schedule.alpha_bar(self.previous_timestep(i))

    def step_mean(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ_t) of x_prev = μ + σ_t z  (DDIM eq. 12 and 16)."""
        self._check_index(i)
        alpha_bar_t = self.schedule.alpha_bar(self.timesteps[i])
        alpha_bar_prev = self.alpha_bar_prev(i)
        eps, x0 = predict_eps_x0(model_output, x, alpha_bar_t, self.prediction_type)
        sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, self.eta)
        return ddim_update(x0, eps, alpha_bar_prev, sigma), sigma

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_prev = μ + σ_t z, z drawn from ``generator`` when η > 0 unless given as ``noise``."""
        mean, sigma = self.step_mean(model_output, i, x)
        if self.eta == 0 and noise is None:
            return mean
        if noise is None:
            noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        return mean + sigma * noise
