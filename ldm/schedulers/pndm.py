"""PNDM (pseudo linear multistep, the SD 1.x diffusers default) and the original CompVis PLMS sampler.

Paper: *Pseudo Numerical Methods for Diffusion Models on Manifolds* (Liu et al., 2022). The "transfer" φ moves x
from t to the previous grid point t' along a given noise estimate e (eq. 9, the DDIM η = 0 step written over
a common denominator):

    φ(x, e, t → t') = √(ᾱ'/ᾱ) x − (ᾱ' − ᾱ) e / (ᾱ √(1−ᾱ') + √(ᾱ (1−ᾱ) ᾱ'))

and e is a linear multistep combination of past model outputs e_k (Adams–Bashforth):

    first step (2 evaluations, pseudo improved Euler): x̃ = φ(x, e_0, t→t'),  x' = φ(x, (e_0 + e_1)/2, t→t')
        with e_1 the model at (x̃, t'); e_1 is then dropped and the model is evaluated again at (x', t')
    then  e = (3e_k − e_{k−1})/2,  (23e_k − 16e_{k−1} + 5e_{k−2})/12,
          (55e_k − 59e_{k−1} + 37e_{k−2} − 9e_{k−3})/24

N grid points cost N+1 evaluations: timesteps [t_0, t_1, t_1, t_2, …, t_{N−1}] (diffusers' PNDMScheduler with
skip_prk_steps=True, which SD 1.x folders set). Past the last grid point ᾱ' = ᾱ_0 (set_alpha_to_one=False).

- ``pndm`` is diffusers' scheduler: grids by spacing, and for v-prediction the raw v outputs are combined first
  and then converted once, ε = √ᾱ v + √(1−ᾱ) x at the x and t that φ starts from.
- ``plms`` is CompVis `PLMSSampler` (the original txt2img script): grid range(0, T, T//N) + 1, which has more
  than N points when N does not divide T, and each output is turned into ε at its own (x, t) before combining.
  For ε-prediction with N dividing T the two are the same sampler.

Correct where diffusers is not: diffusers takes t' = t − T//N whatever the spacing (off the grid on "linspace"
and "trailing" grids when N does not divide T), and its image to image drops the duplicated timestep, skipping
a grid interval after the warm-up. editlab steps to the next grid point, and a run started part-way lays out
its grid from the start point with a fresh warm-up.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Sampler
from .grids import spaced_timesteps
from .schedule import NoiseSchedule, predict_eps_x0

ADAMS_BASHFORTH = {1: ([1], 1), 2: ([3, -1], 2), 3: ([23, -16, 5], 12),
                   4: ([55, -59, 37, -9], 24)}  # (weights of e_k, e_{k−1}, …; divisor)


def compvis_timesteps(num_steps: int, num_train: int = 1000) -> np.ndarray:
    """CompVis `make_ddim_timesteps(uniform)`: range(0, T, T//N) + 1, descending."""
    return (np.arange(0, num_train, num_train // num_steps) + 1)[::-1].astype(np.int64).copy()


class PNDMSampler(Sampler):
    name = "pndm"
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "leading", steps_offset: int = 1, final_alpha_one: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        self.spacing = spacing
        self.final_alpha_one = final_alpha_one
        self.levels = spaced_timesteps(spacing, num_steps, schedule.num_train_timesteps, steps_offset, "vp")
        self._lay_out(0)

    def _lay_out(self, begin: int) -> None:
        """Grid points before ``begin`` (not run), then the warm-up pair and the remaining points."""
        levels = self.levels.tolist()
        run = levels[begin:begin + 1] + [t for t in levels[begin + 1:begin + 2] for _ in range(2)] + levels[begin + 2:]
        self.timesteps = torch.tensor(levels[:begin] + run, dtype=torch.int64)
        self._begin = begin

    def start_index(self, strength: float) -> int:
        begin = super().start_index(strength)
        self._lay_out(begin)
        return begin

    def _alpha_bar_after(self, t: int) -> torch.Tensor:
        """ᾱ at the grid point after t; ᾱ_0 (or 1 with set_alpha_to_one) past the last."""
        position = self.levels.tolist().index(t)
        if position + 1 < len(self.levels):
            return self.schedule.alpha_bar(int(self.levels[position + 1]))
        return torch.tensor(1.0) if self.final_alpha_one else self.schedule.alpha_bar(0)

    def _to_eps(self, output: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        return predict_eps_x0(output, x, self.schedule.alpha_bar(t), self.prediction_type)[0]

    def _transfer(self, x: torch.Tensor, e: torch.Tensor, t: int) -> torch.Tensor:
        """φ(x, e, t → t') (eq. 9); e is converted to ε first for pndm with v-prediction."""
        if self.name == "pndm":
            e = self._to_eps(e, x, t)
        a, a_prev = self.schedule.alpha_bar(t), self._alpha_bar_after(t)
        denominator = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * x - (a_prev - a) * e / denominator

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        if self._begin_step(i):
            self._outputs, self._start = [], None
        call, t = i - self._begin, int(self.timesteps[i])
        output = model_output if self.name == "pndm" else self._to_eps(model_output, x, t)
        if call == 1:  # pseudo improved Euler: average with e_0, restart from the stashed x_0 at t_0
            x, t = self._start
            return self._transfer(x, (output + self._outputs[-1]) / 2, t)
        self._outputs = (self._outputs + [output])[-4:]
        if call == 0:
            self._start = (x, t)
        weights, divisor = ADAMS_BASHFORTH[len(self._outputs)]
        combined = sum(w * e for w, e in zip(weights, reversed(self._outputs)))
        return self._transfer(x, combined / divisor if divisor > 1 else combined, t)


class PLMSSampler(PNDMSampler):
    name = "plms"
    spacings = ("leading",)

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "leading", steps_offset: int = 1, final_alpha_one: bool = False):
        Sampler.__init__(self, schedule, num_steps, prediction_type)
        self.spacing, self.final_alpha_one = "compvis", False
        self.levels = compvis_timesteps(num_steps, schedule.num_train_timesteps)
        self.num_steps = len(self.levels)  # more than asked when N does not divide T
        self._lay_out(0)
