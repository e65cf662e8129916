"""Noise schedule and samplers (DDIM, DDPM, Euler ancestral), step-for-step equal to diffusers' schedulers with
the Stable Diffusion config, including the order of noise draws from a torch.Generator.

    schedule = NoiseSchedule.scaled_linear()
    sampler = make_sampler("ddim", schedule, num_steps=50, eta=0.0, prediction_type="epsilon")
    x = gaussian_noise(shape, generator, device, dtype) * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(unet(sampler.scale_model_input(x, i), t, ...), i, x, generator)
"""

from __future__ import annotations

from .ddim import DDIMSampler, ddim_sigma, ddim_step
from .ddpm import DDPMSampler, ddpm_posterior
from .euler import EULER_SPACINGS, EulerAncestralSampler
from .schedule import (
    PREDICTION_TYPES,
    NoiseSchedule,
    Sampler,
    check_prediction_type,
    gaussian_noise,
    leading_timesteps,
    linspace_timesteps,
    log_linear_sigma_grid,
    log_linear_timesteps,
    predict_eps_x0,
    sigma_grid,
    velocity,
)

SAMPLERS = ("ddim", "ddpm", "euler-a")


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    spacing: str | None = None,
) -> Sampler:
    """Build a sampler by name. eta applies to "ddim" only (DDPM and Euler ancestral are fully stochastic);
    spacing=None picks the sampler's default grid ("leading" for ddim/ddpm, "linspace" for euler-a)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    if name != "ddim" and eta != 0.0:
        raise ValueError(f"eta={eta} applies to 'ddim' only; {name!r} has fixed stochasticity, leave eta at 0")
    if name == "ddim":
        return DDIMSampler(schedule, num_steps, eta, prediction_type, spacing or "leading")
    if name == "ddpm":
        return DDPMSampler(schedule, num_steps, prediction_type, spacing or "leading")
    return EulerAncestralSampler(schedule, num_steps, prediction_type, spacing or "linspace")


__all__ = [
    "SAMPLERS",
    "PREDICTION_TYPES",
    "EULER_SPACINGS",
    "NoiseSchedule",
    "Sampler",
    "DDIMSampler",
    "DDPMSampler",
    "EulerAncestralSampler",
    "make_sampler",
    "check_prediction_type",
    "predict_eps_x0",
    "velocity",
    "ddim_sigma",
    "ddim_step",
    "ddpm_posterior",
    "gaussian_noise",
    "leading_timesteps",
    "linspace_timesteps",
    "log_linear_timesteps",
    "log_linear_sigma_grid",
    "sigma_grid",
]
