"""Noise schedule, timestep grids, ε/v/x̂0 conversion and the interface every sampler shares.

Papers:
- *Denoising Diffusion Probabilistic Models* (Ho et al., 2020): the discrete forward process
  q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I) with ᾱ_t = ∏_{s≤t} (1−β_s) (eq. 4).
- *Progressive Distillation for Fast Sampling of Diffusion Models* (Salimans & Ho, 2022): the
  v-parameterisation v = √ᾱ ε − √(1−ᾱ) x0, used by SD 2.x 768-v.
- *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022) and k-diffusion:
  the σ view, σ_t = √((1−ᾱ_t)/ᾱ_t), x_σ = x_VP·√(σ²+1).

Timestep grids (docs/methods.md §0.2, N = inference steps, T = 1000 training steps):

| grid          | rule                                                  | N=50          | used by             |
|---------------|-------------------------------------------------------|---------------|---------------------|
| leading       | t_k = k·(T//N) + offset, descending (SD: offset 1)    | 981, 961 … 1  | DDIM, DDPM, SDEdit  |
| linspace      | t = linspace(0, T−1, N) reversed, real-valued         | 999 … 0       | diffusers Euler     |
| log-linear    | t = linspace(T−1, 0, N); σ by interpolating log σ_t   | 999 … 0       | k-diffusion (IP2P)  |

The real-valued grids need σ between two integer timesteps: diffusers interpolates σ_t linearly, k-diffusion
interpolates log σ_t. Both append σ = 0 as the end point.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule:
    """β_t and ᾱ_t of the training process, in float32 exactly as diffusers builds them."""

    def __init__(self, betas: torch.Tensor):
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t = ∏_{s≤t} (1 − β_s)

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
    ) -> "NoiseSchedule":
        """Stable Diffusion 1.x/2.x: β = linspace(√β_start, √β_end, T)²; ᾱ_0 = 0.99915, ᾱ_999 = 0.00466."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        return cls(betas)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1−ᾱ_t)/ᾱ_t) for t = 0 … T−1 (float32, increasing)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer t (int or tensor). t < 0 gives ᾱ_0: the "final alpha" of SD configs
        (`set_alpha_to_one=False`), used when a DDIM step goes past t = 0."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if (t != t.round()).any():
                raise ValueError(f"alpha_bar needs integer timesteps, got {t}; use sigma_at for real-valued t")
            t = t.long()
        if (t >= self.num_train_timesteps).any():
            raise ValueError(f"timestep {t} out of range; it must be < {self.num_train_timesteps}")
        return self.alphas_cumprod[t.clamp(min=0)]

    def sigma_at(self, t: torch.Tensor, log_linear: bool = False) -> torch.Tensor:
        """σ at real-valued t by interpolating between the two neighbouring integer timesteps.

        linear (diffusers, np.interp):   σ = (1−w) σ_⌊t⌋ + w σ_⌈t⌉,           w = t − ⌊t⌋
        log-linear (k-diffusion):        σ = exp((1−w) log σ_⌊t⌋ + w log σ_⌈t⌉)
        Computed in float64 from the float32 σ_t, returned as float32.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        if (t < 0).any() or (t > self.num_train_timesteps - 1).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t}")
        table = self.sigmas.double()
        if log_linear:
            table = table.log()
        low, high = t.floor().long(), t.ceil().long()
        weight = t - low
        sigma = (1 - weight) * table[low] + weight * table[high]
        return (sigma.exp() if log_linear else sigma).float()


# --- timestep grids --------------------------------------------------------------------------------------


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}")


def leading_timesteps(num_steps: int, offset: int = 1, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers "leading" grid: t_k = k·(T//N) + offset for k = N−1 … 0 (int64, descending).
    SD configs use offset 1 (N=50: 981, 961, …, 1); the null-text notebook uses offset 0 (980 … 0)."""
    _check_num_steps(num_steps, num_train_timesteps)
    step_ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * step_ratio + offset


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers Euler "linspace" grid: t = linspace(0, T−1, N) reversed (float32, real-valued)."""
    _check_num_steps(num_steps, num_train_timesteps)
    grid = torch.linspace(0, num_train_timesteps - 1, num_steps, dtype=torch.float64)  # float64 as np.linspace
    return grid.flip(0).float()


def log_linear_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """k-diffusion `DiscreteSchedule.get_sigmas` grid: t = linspace(T−1, 0, N) (float32)."""
    _check_num_steps(num_steps, num_train_timesteps)
    return torch.linspace(num_train_timesteps - 1, 0, num_steps, dtype=torch.float32)


def sigma_grid(schedule: NoiseSchedule, timesteps: torch.Tensor, log_linear: bool = False) -> torch.Tensor:
    """[σ(t_0), …, σ(t_{N−1}), 0]: the Euler σ grid for the given timesteps, σ = 0 appended (float32)."""
    sigmas = schedule.sigma_at(timesteps, log_linear=log_linear)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_linear_sigma_grid(schedule: NoiseSchedule, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's discrete grid (docs/methods.md §0.2), used by InstructPix2Pix `edit_cli.py`:
    t = linspace(999, 0, N), σ by log-linear interpolation of log σ_t, σ = 0 appended. σ_0 = σ at t=999.
    Returns (timesteps [N], sigmas [N+1])."""
    timesteps = log_linear_timesteps(num_steps, schedule.num_train_timesteps)
    return timesteps, sigma_grid(schedule, timesteps, log_linear=True)


# --- prediction-type conversion --------------------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _per_sample(alpha_bar: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A [B] tensor of ᾱ becomes [B, 1, 1, 1] so it broadcasts over x; scalars pass through."""
    if torch.is_tensor(alpha_bar) and alpha_bar.ndim == 1:
        return alpha_bar.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, 1, 1]
    return alpha_bar


def predict_eps_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) from the raw UNet output at x_t = √ᾱ x0 + √(1−ᾱ) ε.

    epsilon:       ε̂ = output,                 x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ
    v_prediction:  x̂0 = √ᾱ x_t − √(1−ᾱ) v,     ε̂ = √ᾱ v + √(1−ᾱ) x_t       (v = √ᾱ ε − √(1−ᾱ) x0)
    """
    check_prediction_type(prediction_type)
    alpha_bar = _per_sample(alpha_bar, x_t)
    sqrt_alpha, sqrt_one_minus_alpha = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_one_minus_alpha * eps) / sqrt_alpha
    else:
        x0 = sqrt_alpha * x_t - sqrt_one_minus_alpha * model_output
        eps = sqrt_alpha * model_output + sqrt_one_minus_alpha * x_t
    return eps, x0


def velocity(eps: torch.Tensor, x0: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """v = √ᾱ ε − √(1−ᾱ) x0: the training target of a v-prediction model."""
    alpha_bar = _per_sample(alpha_bar, x0)
    return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


# --- noise and the shared sampler interface --------------------------------------------------------------


def gaussian_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """z ~ N(0, I), drawn as diffusers' `randn_tensor`: on the generator's device (a CPU generator draws on the
    CPU, then the tensor moves to `device`); a list of generators draws one batch item from each."""
    if generator is None:
        raise ValueError("this step adds noise and needs a torch.Generator; pass generator=torch.Generator()")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per item")
        items = [gaussian_noise((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(items, dim=0)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class Sampler:
    """What the pipeline calls, indexed by the step index i (0 … N−1):

        x = randn * sampler.init_noise_sigma
        for i, t in enumerate(sampler.timesteps):
            out = unet(sampler.scale_model_input(x, i), t)
            x = sampler.step(out, i, x, generator)

    SDEdit starts at i0 = start_index(strength) from x = add_noise(x0, noise, i0). This base class is the
    variance-preserving (VP) case shared by DDIM and DDPM; Euler overrides the σ-scaled parts.
    """

    name = "base"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, prediction_type: str = "epsilon"):
        _check_num_steps(num_steps, schedule.num_train_timesteps)
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.num_steps = num_steps
        self.prediction_type = prediction_type
        self.init_noise_sigma = 1.0  # VP samplers start from x_T ~ N(0, I)
        self.timesteps = torch.empty(0)  # set by subclasses

    def __len__(self) -> int:
        return self.num_steps

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index {i} out of range for a {self.num_steps}-step {self.name} sampler")

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """VP samplers feed x_t to the UNet unchanged."""
        self._check_index(i)
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) z at t = timesteps[i] (DDPM eq. 4)."""
        self._check_index(i)
        alpha_bar = self.schedule.alpha_bar(self.timesteps[i]).to(x0.device, x0.dtype)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise

    def start_index(self, strength: float) -> int:
        """SDEdit start (diffusers img2img, docs/methods.md §5): k = min(⌊N·strength⌋, N) steps run, from
        index N − k."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        steps_to_run = min(int(self.num_steps * strength), self.num_steps)
        if steps_to_run == 0:
            raise ValueError(
                f"strength {strength} with {self.num_steps} steps runs no step; raise strength or num_steps"
            )
        return self.num_steps - steps_to_run

    def step(
        self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError
