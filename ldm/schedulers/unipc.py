"""UniPC: unified predictor-corrector, variant B2(h), order 2, data prediction.

Paper: *UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models* (Zhao et al.,
2023), Algorithms 1-2 (UniP-p, UniC-p) with B(h) = e^{−h} − 1 ("bh2"). Notation as in ``dpm_solver``:
α, σ^VP, λ = −log σ, h = λ_t − λ_{s0}, ĥ = −h, m = x̂0, and r_k = (λ_{s_k} − λ_{s0})/h, D_k = (m_k − m_0)/r_k.

    base:       x̄ = (σ^VP_t/σ^VP_{s0}) x_{s0} − α_t (e^{ĥ} − 1) m_0                   (= DPM-Solver++ 1st order)
    UniP-2:     x_t = x̄ − α_t B(h)·½·D_1                                                (ρ = ½ at order 2)
    UniC-p:     x_t^c = x̄ − α_t B(h)(Σ_k ρ_k D_k + ρ_p (m_t − m_0)),   R ρ = b
                R_{jk} = r_k^{j}, b_j = ĥ φ_{j+1}(ĥ)·j!/B(h), φ_1(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z

The corrector runs at the start of each step after the first, using the model output at the predicted point
(no extra evaluation), and with ρ = ½ after a 1st-order predictor. Orders rise 1, 2 with the history and drop
to 1 on the last step ("lower_order_final"); there is no corrector after the last step. No noise, no float32
upcast. Grids as DPM-Solver++.
"""

from __future__ import annotations

import torch

from .base import SolverSampler
from .grids import sampler_sigmas
from .schedule import NoiseSchedule

ORDER = 2


class UniPCSampler(SolverSampler):
    name = "unipc"
    karras = True
    zero_snr = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1, karras: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        self.spacing = spacing
        self._set_grid(*sampler_sigmas(schedule, spacing, num_steps, steps_offset, karras, "solver"))
        self._reset()

    def _reset(self) -> None:
        self._history: list[torch.Tensor] = []  # x̂0 of the last ORDER steps, newest last
        self._last_sample: torch.Tensor | None = None  # x_{s0}, where the previous predictor started
        self._last_order = 1

    def _coefficients(self, i_t: int, i_s0: int, order: int):
        """(α_t, σ_t/σ_s0, ĥ, e^{ĥ} − 1, B(h), r) for a step from σ_{i_s0} to σ_{i_t}; r holds r_1 … r_{p−1}, 1."""
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[i_t])
        _, sigma_s0 = self.alpha_sigma(self.sigmas[i_s0])
        h = self.log_snr(i_t) - self.log_snr(i_s0)
        r = [(self.log_snr(i_s0 - k) - self.log_snr(i_s0)) / h for k in range(1, order)]
        hh = -h
        h_phi_1 = torch.expm1(hh)  # ĥ φ_1(ĥ) = e^{ĥ} − 1
        return alpha_t, sigma_t / sigma_s0, hh, h_phi_1, torch.expm1(hh), torch.stack(r + [torch.ones(())])

    @staticmethod
    def _rho(r: torch.Tensor, hh: torch.Tensor, h_phi_1: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
        """Solve R ρ = b for the corrector weights."""
        rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, len(r) + 1):
            rows.append(torch.pow(r, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.linalg.solve(torch.stack(rows), torch.stack(b))

    def _corrector(self, x0_t: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """UniC at σ_i: recompute the last step from x_{s0} with the new model output m_t."""
        order = self._last_order
        alpha_t, ratio, hh, h_phi_1, b_h, r = self._coefficients(i, i - 1, order)
        m0 = self._history[-1]
        rho = torch.ones(1, dtype=x.dtype) * 0.5 if order == 1 else self._rho(r, hh, h_phi_1, b_h).to(x.dtype)
        base = ratio * self._last_sample - alpha_t * h_phi_1 * m0
        past = sum(rho[k - 1] * (self._history[-(k + 1)] - m0) / r[k - 1] for k in range(1, order))
        return (base - alpha_t * b_h * (past + rho[-1] * (x0_t - m0))).to(x.dtype)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        if self._begin_step(i):
            self._reset()
        x0 = self.predict_x0(model_output, x, i)
        if self._last_sample is not None:
            x = self._corrector(x0, x, i)
        self._history = (self._history + [x0])[-ORDER:]
        order = min(ORDER, len(self.timesteps) - i, len(self._history))
        self._last_sample, self._last_order = x, order
        alpha_t, ratio, hh, h_phi_1, b_h, r = self._coefficients(i + 1, i, order)
        x_next = ratio * x - alpha_t * h_phi_1 * x0  # x̄
        if order == 2:  # UniP-2, ρ = ½
            x_next = x_next - alpha_t * b_h * (0.5 * (self._history[-2] - x0) / r[0])
        return x_next.to(x.dtype)
