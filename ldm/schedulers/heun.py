"""Heun's method (2nd-order) in the σ view.

Paper: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022), Algorithm 1
(k-diffusion `sample_heun` without churn). With d(x, σ) = (x − D(x, σ))/σ and D = x̂0:

    x̃ = x_i + (σ_{i+1} − σ_i)·d(x_i, σ_i)                                  (Euler predictor)
    x_{i+1} = x_i + (σ_{i+1} − σ_i)·½(d(x_i, σ_i) + d(x̃, σ_{i+1}))          (trapezoidal corrector)

and a plain Euler step into σ = 0. The model is evaluated twice per step, so the grid is doubled as in
diffusers: timesteps [t_0, t_1, t_1, …, t_{N−1}, t_{N−1}] (2N−1 evaluations); even indices are predictor calls,
odd ones correctors. No noise, no float32 upcast. Image to image starts at index 2·(N − k), a predictor call.
"""

from __future__ import annotations

import torch

from .base import SigmaSampler
from .grids import sampler_sigmas
from .schedule import NoiseSchedule


class HeunSampler(SigmaSampler):
    name = "heun"
    order = 2
    karras = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1, karras: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        timesteps, sigmas = sampler_sigmas(schedule, spacing, num_steps, steps_offset, karras, "sigma")
        doubled_t = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])  # [2N−1]
        doubled_sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])  # [2N]
        self._set_grid(doubled_t, doubled_sigmas, spacing)
        self._first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (x_i, d_i, σ_{i+1} − σ_i)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._begin_step(i)
        if i % 2 == 0:  # predictor at (x_i, σ_i)
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            derivative = (x - self.denoised(model_output, x, sigma)) / sigma
            dt = sigma_next - sigma
            self._first = (x, derivative, dt)
            return x + derivative * dt
        if self._first is None:
            raise ValueError(f"heun step {i} is a corrector step; start a run at an even index")
        x_i, d_i, dt = self._first
        sigma_next = self.sigmas[i]  # the model saw x̃ at σ_{i+1}
        derivative = (d_i + (x - self.denoised(model_output, x, sigma_next)) / sigma_next) / 2
        self._first = None
        return x_i + derivative * dt
