"""Noise schedule, forward noising, training targets, ε/v/x̂0 conversion and seeded noise.

Papers:
- *Denoising Diffusion Probabilistic Models* (Ho et al., 2020): the discrete forward process
  q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I) with ᾱ_t = ∏_{s≤t} (1−β_s) (eq. 4).
- *Progressive Distillation for Fast Sampling of Diffusion Models* (Salimans & Ho, 2022): the
  v-parameterisation v = √ᾱ ε − √(1−ᾱ) x0, used by SD 2.x 768-v.
- *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022) and k-diffusion:
  the σ view, σ_t = √((1−ᾱ_t)/ᾱ_t), x_σ = x_VP·√(σ²+1).
- *Common Diffusion Noise Schedules and Sample Steps are Flawed* (Lin et al., 2024), Algorithm 1: rescale
  √ᾱ so that the last timestep has zero signal (zero terminal SNR).

Every training loss draws (t, ε), forms x_t with ``q_sample`` and regresses ``training_target``; every sampler
adds noise for image-to-image with the same ``q_sample`` (VP samplers) or its σ form x0 + σ ε (k-space samplers).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")


class NoiseSchedule:
    """β_t and ᾱ_t of the training process, in float32 exactly as diffusers builds them."""

    def __init__(self, betas: torch.Tensor, zero_terminal_snr: bool = False):
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = rescale_zero_terminal_snr(betas.float()) if zero_terminal_snr else betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t = ∏_{s≤t} (1 − β_s)

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Stable Diffusion 1.x/2.x: β = linspace(√β_start, √β_end, T)²; ᾱ_0 = 0.99915, ᾱ_999 = 0.00466."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        return cls(betas, zero_terminal_snr)

    @classmethod
    def from_config(cls, config: dict, zero_terminal_snr: bool | None = None) -> "NoiseSchedule":
        """The schedule a diffusers scheduler_config.json describes (keys beta_start, beta_end, beta_schedule,
        num_train_timesteps, trained_betas, rescale_betas_zero_snr); absent keys take Stable Diffusion's values.
        ``zero_terminal_snr`` overrides the config's rescale_betas_zero_snr."""
        if zero_terminal_snr is None:
            zero_terminal_snr = bool(config.get("rescale_betas_zero_snr", False))
        if config.get("trained_betas") is not None:
            return cls(torch.tensor(config["trained_betas"], dtype=torch.float32), zero_terminal_snr)
        kind = config.get("beta_schedule", "scaled_linear")
        start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
        steps = config.get("num_train_timesteps", 1000)
        if kind == "scaled_linear":
            return cls.scaled_linear(start, end, steps, zero_terminal_snr)
        if kind == "linear":
            return cls(torch.linspace(start, end, steps, dtype=torch.float32), zero_terminal_snr)
        raise ValueError(f"beta_schedule {kind!r} is not supported; editlab samples {' and '.join(BETA_SCHEDULES)}")

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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. Algorithm 1: shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_0 is kept, then back to β.

        s = √ᾱ;  s ← (s − s_T)·s_0/(s_0 − s_T);  ᾱ = s²;  α_t = ᾱ_t/ᾱ_{t−1} (α_0 = ᾱ_0);  β = 1 − α
    """
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    alpha_bar = s**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# --- forward noising and training targets ----------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _per_sample(alpha_bar: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A [B] tensor of ᾱ becomes [B, 1, 1, 1] so it broadcasts over x; scalars pass through."""
    if torch.is_tensor(alpha_bar) and alpha_bar.ndim == 1:
        return alpha_bar.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, 1, 1]
    return alpha_bar


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε   (DDPM eq. 4); ``alpha_bar`` is one value or one per sample [B]."""
    alpha_bar = _per_sample(alpha_bar, x0)
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def velocity(eps: torch.Tensor, x0: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """v = √ᾱ ε − √(1−ᾱ) x0: the training target of a v-prediction model."""
    alpha_bar = _per_sample(alpha_bar, x0)
    return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the UNet regresses at x_t = q_sample(x0, ε, ᾱ): ε for ε-prediction, v for v-prediction."""
    check_prediction_type(prediction_type)
    return noise if prediction_type == "epsilon" else velocity(noise, x0, alpha_bar)


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


# --- noise -----------------------------------------------------------------------------------------------


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
