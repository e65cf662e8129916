"""What every sampler shares: the interface the sampling loop calls, and the two state spaces.

    x = gaussian_noise(...) * sampler.init_noise_sigma              (image to image: sampler.add_noise at i0)
    for i in range(i0, len(sampler)):
        x_in = sampler.scale_model_input(x, i)                        (done once, by the loop)
        x = sampler.step(model(x_in, sampler.timesteps[i]), i, x, generator)

- VP samplers (DDIM, DDPM, PNDM/PLMS, DPM-Solver++, UniPC) keep x_t = √ᾱ x0 + √(1−ᾱ) ε and feed it to the model
  unchanged.
- σ samplers (Euler, Euler ancestral, Heun, LMS) keep x = x_t/√ᾱ = x0 + σ ε (Karras et al.'s view) and feed the
  model c_in·x with c_in = 1/√(σ²+1), which is x_t again.

Image to image (SDEdit) starts as diffusers' img2img does: k = min(⌊N·strength⌋, N) steps run, from step
N − k (times the sampler's order: Heun evaluates twice per step). Multistep samplers start their history anew
whenever a step does not follow the previous one, so a run started part-way warms up like a fresh run.
"""

from __future__ import annotations

import torch

from .grids import SPACINGS, check_num_steps
from .schedule import NoiseSchedule, check_prediction_type, q_sample


class Sampler:
    name = "base"
    order = 1  # model evaluations per step of the grid
    spacings = SPACINGS  # the spacings this sampler can use
    karras = False  # whether it can space σ as Karras et al.
    zero_snr = False  # whether it can sample a zero-terminal-SNR schedule
    stochastic = False  # whether step() draws noise (needs a generator)
    default_spacing = "linspace"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, prediction_type: str = "epsilon"):
        check_num_steps(num_steps, schedule.num_train_timesteps)
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.num_steps = num_steps
        self.prediction_type = prediction_type
        self.init_noise_sigma = 1.0  # VP samplers start from x_T ~ N(0, I)
        self.timesteps = torch.empty(0)  # set by subclasses
        self._next = None  # the step index that continues the current run

    def __len__(self) -> int:
        """Model evaluations in a full run (N, or more for Heun and PNDM)."""
        return len(self.timesteps)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self.timesteps):
            raise ValueError(f"step index {i} out of range for a {len(self.timesteps)}-step {self.name} sampler")

    def _begin_step(self, i: int) -> bool:
        """Check i; True when step i starts a new run (multistep samplers then clear their history)."""
        self._check_index(i)
        fresh = i != self._next
        self._next = i + 1
        return fresh

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """VP samplers feed x_t to the UNet unchanged."""
        self._check_index(i)
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) z at t = timesteps[i] (DDPM eq. 4)."""
        self._check_index(i)
        return q_sample(x0, noise, self.schedule.alpha_bar(self.timesteps[i]).to(x0.device, x0.dtype))

    def start_index(self, strength: float) -> int:
        """Image to image as diffusers' img2img: k = min(⌊N·strength⌋, N) steps run, from index (N − k)·order."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        steps_to_run = min(int(self.num_steps * strength), self.num_steps)
        if steps_to_run == 0:
            raise ValueError(
                f"strength {strength} with {self.num_steps} steps runs no step; raise strength or num_steps"
            )
        return (self.num_steps - steps_to_run) * self.order

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class SigmaSampler(Sampler):
    """A sampler in the σ view: ``timesteps`` (real-valued) and ``sigmas`` [len + 1] ending in 0."""

    def _set_grid(self, timesteps: torch.Tensor, sigmas: torch.Tensor, spacing: str) -> None:
        self.timesteps, self.sigmas, self.spacing = timesteps, sigmas, spacing
        sigma_max = sigmas.max()
        # diffusers starts "leading" grids from √(σ_max²+1)·z and the others from σ_max·z
        self.init_noise_sigma = float((sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """c_in·x with c_in = 1/√(σ_i²+1): the UNet expects VP-scaled input."""
        self._check_index(i)
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_σ = x0 + σ_i z (the σ-scaled counterpart of √ᾱ x0 + √(1−ᾱ) z)."""
        self._check_index(i)
        return x0 + self.sigmas[i].to(x0.device, x0.dtype) * noise

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D = x̂0 at noise level σ:  ε: D = x − σ ε̂;  v: D = x/(σ²+1) − σ v/√(σ²+1)   (c_skip, c_out of the
        σ view, Karras et al. Table 1)."""
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


class SolverSampler(Sampler):
    """A VP sampler on a σ grid whose steps are written in log-SNR λ = log α − log σ_VP
    (α = 1/√(σ²+1), σ_VP = σ α): DPM-Solver++ and UniPC. The model output is turned into x̂0 and kept."""

    def _set_grid(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self.timesteps, self.sigmas = timesteps, sigmas

    @staticmethod
    def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ_VP) = (1/√(σ²+1), σ/√(σ²+1))."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def log_snr(self, i: int) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(self.sigmas[i])
        return torch.log(alpha) - torch.log(sigma)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_t = α x0 + σ_VP z at σ_i (= √ᾱ x0 + √(1−ᾱ) z)."""
        self._check_index(i)
        alpha, sigma = self.alpha_sigma(self.sigmas[i].to(x0.device, x0.dtype))
        return alpha * x0 + sigma * noise

    def predict_x0(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """ε: x̂0 = (x − σ_VP ε̂)/α;  v: x̂0 = α x − σ_VP v."""
        alpha, sigma = self.alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output
