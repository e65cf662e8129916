"""DPM-Solver++(2M) and its SDE variant: multistep exponential integrators in log-SNR.

Papers: *DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models* (Lu et al., 2022),
Algorithm 2 (multistep second order, data prediction); the SDE variant is the same update for the
reverse SDE, as k-diffusion's `sample_dpmpp_2m_sde` (η = 1). With α_i = 1/√(σ_i²+1), σ_i^VP = σ_i α_i, λ_i = log(α_i/σ_i^VP) = −log σ_i,
h = λ_{i+1} − λ_i, the model's x̂0 stored as m_i, and r = h_{i−1}/h:

    D = D0 + ½ D1,  D0 = m_i,  D1 = (m_i − m_{i−1})/r                      (2nd order; D = m_i at 1st order)
    ODE (Alg. 2):  x_{i+1} = (σ^VP_{i+1}/σ^VP_i) x_i − α_{i+1}(e^{−h} − 1) D
    SDE:           x_{i+1} = (σ^VP_{i+1}/σ^VP_i) e^{−h} x_i + α_{i+1}(1 − e^{−2h}) D + σ^VP_{i+1} √(1 − e^{−2h}) z

(the "midpoint" form of D, diffusers' default solver_type). The first step has no history and is 1st order;
the last step, into σ = 0 (λ = ∞), is 1st order and returns x̂0, as diffusers' default final_sigmas_type
"zero". The SDE draws z in float32 on every step, also the last, after the x̂0 conversion. The x̂0 conversion
runs in the model's dtype, the update in float32.

Grids (``grids``): N+1-point "linspace" and "leading" with the last point dropped, or "trailing"; Karras σ over
the whole training range with rounded timesteps.
"""

from __future__ import annotations

import torch

from .base import SolverSampler
from .grids import sampler_sigmas
from .schedule import NoiseSchedule, gaussian_noise


class DPMSolverSampler(SolverSampler):
    name = "dpm++2m"
    karras = True
    zero_snr = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, prediction_type: str = "epsilon",
                 spacing: str = "linspace", steps_offset: int = 1, karras: bool = False, sde: bool = False):
        super().__init__(schedule, num_steps, prediction_type)
        self.sde = self.stochastic = sde
        self.name = "dpm++2m-sde" if sde else "dpm++2m"
        self.spacing = spacing
        self._set_grid(*sampler_sigmas(schedule, spacing, num_steps, steps_offset, karras, "solver"))
        self._previous: torch.Tensor | None = None  # m_{i−1}, x̂0 of the previous step

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        if self._begin_step(i):
            self._previous = None
        x0 = self.predict_x0(model_output, x, i)
        noise = gaussian_noise(x0.shape, generator, x0.device, torch.float32) if self.sde else None
        first_order = self._previous is None or i == len(self.timesteps) - 1
        alpha_next, sigma_next = self.alpha_sigma(self.sigmas[i + 1])
        _, sigma = self.alpha_sigma(self.sigmas[i])
        h = self.log_snr(i + 1) - self.log_snr(i)
        d1 = 0.0 if first_order else (1.0 / ((self.log_snr(i) - self.log_snr(i - 1)) / h)) * (x0 - self._previous)
        self._previous = x0
        x = x.float()
        if not self.sde:  # − α'(e^{−h} − 1)(D0 + ½ D1)
            decay = alpha_next * (torch.exp(-h) - 1.0)
            x_next = (sigma_next / sigma) * x - decay * x0 - 0.5 * decay * d1
        else:  # + α'(1 − e^{−2h})(D0 + ½ D1) + σ'^VP √(1 − e^{−2h}) z
            gain = alpha_next * (1 - torch.exp(-2.0 * h))
            x_next = ((sigma_next / sigma * torch.exp(-h)) * x + gain * x0 + 0.5 * gain * d1
                      + sigma_next * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise)
        return x_next.to(model_output.dtype)
