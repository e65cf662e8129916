"""Timestep and σ grids: where a sampler evaluates the model.

N = inference steps, T = training steps (1000), offset = the config's steps_offset (SD: 1). Three spacings, as
diffusers names them; their exact formulas differ between three families of samplers, and editlab follows
diffusers in each so that the same config gives the same grid:

| spacing  | VP samplers (DDIM, DDPM, PNDM): int        | σ samplers (Euler, Heun, LMS): real | solvers (DPM++, UniPC): int          |
|----------|--------------------------------------------|-------------------------------------|--------------------------------------|
| linspace | round(linspace(0, T−1, N)) reversed        | linspace(0, T−1, N) reversed        | round(linspace(0, T−1, N+1)) reversed, last dropped |
| leading  | k·(T//N) + offset, k = N−1 … 0             | same, as float                      | k·(T//(N+1)) + offset, k = N … 1     |
| trailing | round(T − k·T/N) − 1, k = 0 … N−1          | same, as float                      | same                                 |

"trailing" starts at t = T−1 (Lin et al., *Common Diffusion Noise Schedules and Sample Steps are Flawed*, Table 2);
"leading" never reaches it. The σ grids take σ(t) by linear interpolation of the training σ_t table and end in
σ = 0. Karras et al. (*Elucidating the Design Space*, eq. 5) space σ instead:

    σ_k = (σ_max^{1/ρ} + k/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,   ρ = 7,   k = 0 … N−1

with t(σ) by interpolating log σ between training steps. The σ samplers take σ_max, σ_min from the ends of
their spaced grid (real-valued t); the solvers take the whole training range and round t to integers.
Grids are computed in numpy float64 and cast to float32 where diffusers casts, so they agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from .schedule import NoiseSchedule

SPACINGS = ("leading", "linspace", "trailing")
KARRAS_RHO = 7.0


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}")


def spaced_timesteps(spacing: str, num_steps: int, num_train: int, offset: int, family: str) -> np.ndarray:
    """The descending grid of the table above; family is "vp", "sigma" or "solver"."""
    check_num_steps(num_steps, num_train)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    points = num_steps + 1 if family == "solver" and spacing != "trailing" else num_steps
    if spacing == "linspace":
        grid = np.linspace(0, num_train - 1, points, dtype=np.float32 if family == "sigma" else np.float64)[::-1]
        grid = grid if family == "sigma" else grid.round()
    elif spacing == "leading":
        grid = (np.arange(0, points) * (num_train // points)).round()[::-1] + offset
    else:
        grid = np.arange(num_train, 0, -num_train / num_steps).round() - 1
    if family == "solver" and spacing != "trailing":
        grid = grid[:-1]
    return grid.astype(np.float32 if family == "sigma" else np.int64).copy()


def leading_timesteps(num_steps: int, offset: int = 1, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers "leading" grid: t_k = k·(T//N) + offset for k = N−1 … 0 (int64, descending).
    SD configs use offset 1 (N=50: 981, 961, …, 1); the null-text notebook uses offset 0 (980 … 0)."""
    return torch.from_numpy(spaced_timesteps("leading", num_steps, num_train_timesteps, offset, "vp"))


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers Euler "linspace" grid: t = linspace(0, T−1, N) reversed (float32, real-valued)."""
    return torch.from_numpy(spaced_timesteps("linspace", num_steps, num_train_timesteps, 0, "sigma"))


def log_linear_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """k-diffusion `DiscreteSchedule.get_sigmas` grid: t = linspace(T−1, 0, N) (float32)."""
    check_num_steps(num_steps, num_train_timesteps)
    return torch.linspace(num_train_timesteps - 1, 0, num_steps, dtype=torch.float32)


def sigma_grid(schedule: NoiseSchedule, timesteps: torch.Tensor, log_linear: bool = False) -> torch.Tensor:
    """[σ(t_0), …, σ(t_{N−1}), 0]: the Euler σ grid for the given timesteps, σ = 0 appended (float32)."""
    sigmas = schedule.sigma_at(timesteps, log_linear=log_linear)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_linear_sigma_grid(schedule: NoiseSchedule, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's discrete grid, used by InstructPix2Pix `edit_cli.py`:
    t = linspace(999, 0, N), σ by log-linear interpolation of log σ_t, σ = 0 appended. σ_0 = σ at t=999.
    Returns (timesteps [N], sigmas [N+1])."""
    timesteps = log_linear_timesteps(num_steps, schedule.num_train_timesteps)
    return timesteps, sigma_grid(schedule, timesteps, log_linear=True)


# --- σ grids of the σ samplers and the solvers ------------------------------------------------------------


def sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """σ_t for t = 0 … T−1 (float32). With zero terminal SNR ᾱ_{T−1} = 0 gives σ = ∞; like diffusers, the σ
    samplers and solvers then use ᾱ_{T−1} = 2⁻²⁴ (σ_max = 4096)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.zero_terminal_snr:
        alphas_cumprod[-1] = 2.0**-24
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Karras et al. eq. 5 with ρ = 7 (float64)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (max_inv + ramp * (min_inv - max_inv)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Real-valued t with σ(t) = σ: linear interpolation of log σ between the two neighbouring training steps
    (w clipped to [0, 1], the upper neighbour at most T−1)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.cumsum(log_sigma[None, :] - log_table[:, None] >= 0, axis=0).argmax(axis=0)
    low = low.clip(max=len(log_table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sampler_sigmas(schedule: NoiseSchedule, spacing: str, num_steps: int, offset: int, karras: bool,
                   family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [N], sigmas [N+1] ending in 0) of a σ sampler (family "sigma": float timesteps) or a solver
    (family "solver": int64 timesteps)."""
    table = sigma_table(schedule)
    log_table = np.log(table)
    timesteps = spaced_timesteps(spacing, num_steps, schedule.num_train_timesteps, offset, family)
    if not karras:
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
    elif family == "sigma":  # ends of the spaced grid, real-valued t
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        timesteps = sigma_to_t(sigmas, log_table)
    else:  # the whole training range, t rounded
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
        timesteps = sigma_to_t(sigmas, log_table).round()
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    dtype = np.float32 if family == "sigma" else np.int64
    return torch.from_numpy(timesteps.astype(dtype)), torch.from_numpy(sigmas)
