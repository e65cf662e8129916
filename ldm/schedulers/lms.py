"""Linear multistep (LMS) in the σ view.

Paper: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022) for the ODE
dx/dσ = d(x, σ) = (x − D)/σ; the method is the Adams–Bashforth family on the non-uniform σ grid (k-diffusion
`sample_lms`). With the last p ≤ 4 derivatives d_i, d_{i−1}, … and their σ's:

    x_{i+1} = x_i + Σ_j c_j d_{i−j},   c_j = ∫_{σ_i}^{σ_{i+1}} ∏_{k≠j} (τ − σ_{i−k})/(σ_{i−j} − σ_{i−k}) dτ

i.e. the integral of the Lagrange polynomial through the past derivatives. The order p grows 1, 2, 3, 4 as
derivatives accumulate. The integrals are of polynomials, so they are computed exactly (diffusers uses
adaptive quadrature, exact for these degrees to rounding). No noise, no float32 upcast.

Correct where diffusers is not: diffusers takes p = min(step index + 1, 4), so image to image started at
step 5 uses 4th-order weights with a single derivative (and the wrong weight for it); editlab counts the
derivatives it holds, as k-diffusion does, so a run started part-way warms up with orders 1, 2, 3, 4.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SigmaSampler
from .grids import sampler_sigmas
from .schedule import NoiseSchedule

MAX_ORDER = 4


def lms_coefficient(sigmas: list[float], j: int, sigma_from: float, sigma_to: float) -> float:
    """∫ from σ_from to σ_to of the Lagrange basis polynomial that is 1 at sigmas[j] and 0 at the others."""
    basis = np.poly1d([1.0])
    for k, s in enumerate(sigmas):
        if k != j:
            basis = basis * np.poly1d([1.0, -s]) / (sigmas[j] - s)
    antiderivative = basis.integ()
    return float(antiderivative(sigma_to) - antiderivative(sigma_from))


class LMSSampler(SigmaSampler):
    name = "lms"
    karras = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1, karras: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        self._set_grid(*sampler_sigmas(schedule, spacing, num_steps, steps_offset, karras, "sigma"), spacing)
        self._derivatives: list[torch.Tensor] = []  # newest last

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        if self._begin_step(i):
            self._derivatives = []
        sigma = self.sigmas[i]
        self._derivatives = (self._derivatives + [(x - self.denoised(model_output, x, sigma)) / sigma])[-MAX_ORDER:]
        order = len(self._derivatives)
        past = [float(self.sigmas[i - j]) for j in range(order)]  # σ_i, σ_{i−1}, …
        update = sum(lms_coefficient(past, j, float(sigma), float(self.sigmas[i + 1])) * d
                     for j, d in enumerate(reversed(self._derivatives)))
        return x + update
