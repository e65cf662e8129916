"""Noise schedule and samplers, each step-for-step equal to the diffusers scheduler of the same name on the
same config (including the order of noise draws from a torch.Generator), except where a module's docstring
says diffusers is wrong.

    schedule = NoiseSchedule.scaled_linear()
    sampler = make_sampler("dpm++2m", schedule, num_steps=20, karras=True)
    x = gaussian_noise(shape, generator, device, dtype) * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(unet(sampler.scale_model_input(x, i), t, ...), i, x, generator)
"""

from __future__ import annotations

from .base import Sampler, SigmaSampler, SolverSampler
from .ddim import DDIMSampler, ddim_sigma, ddim_update
from .ddpm import DDPMSampler, ddpm_posterior
from .dpm_solver import DPMSolverSampler
from .from_config import (sampler_from_config, scheduler_config_json, source_scheduler_config,
                          standard_scheduler_config)
from .euler import EULER_SPACINGS, EulerAncestralSampler, EulerSampler
from .grids import (SPACINGS, karras_sigmas, leading_timesteps, linspace_timesteps, log_linear_sigma_grid,
                    log_linear_timesteps, sigma_grid)
from .heun import HeunSampler
from .lms import LMSSampler
from .pndm import PLMSSampler, PNDMSampler
from .schedule import (PREDICTION_TYPES, NoiseSchedule, check_prediction_type, gaussian_noise, predict_eps_x0,
                       q_sample, training_target, velocity)
from .unipc import UniPCSampler

SAMPLER_CLASSES = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "euler-a": EulerAncestralSampler,
                   "euler": EulerSampler, "heun": HeunSampler, "lms": LMSSampler, "dpm++2m": DPMSolverSampler,
                   "dpm++2m-sde": DPMSolverSampler, "unipc": UniPCSampler, "pndm": PNDMSampler,
                   "plms": PLMSSampler}
SAMPLERS = tuple(SAMPLER_CLASSES)

# the diffusers class (and config) each sampler equals, and AUTOMATIC1111's names (≤ 1.8 combined names; from
# 1.9 the same samplers are "Sampler" + "Schedule type": Karras or Uniform/Automatic)
DIFFUSERS_NAMES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-sde": "DPMSolverMultistepScheduler(algorithm_type=\"sde-dpmsolver++\")",
    "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler(skip_prk_steps=True)",
    "plms": "PNDMScheduler(skip_prk_steps=True) when N divides 1000 (CompVis PLMSSampler)",
}
A1111_NAMES = {  # name -> (sampler, karras)
    "Euler a": ("euler-a", False), "Euler": ("euler", False), "Euler Karras": ("euler", True),
    "LMS": ("lms", False), "LMS Karras": ("lms", True), "Heun": ("heun", False), "Heun Karras": ("heun", True),
    "DPM++ 2M": ("dpm++2m", False), "DPM++ 2M Karras": ("dpm++2m", True),
    "DPM++ 2M SDE": ("dpm++2m-sde", False), "DPM++ 2M SDE Karras": ("dpm++2m-sde", True),
    "UniPC": ("unipc", False), "DDIM": ("ddim", False), "PLMS": ("plms", False), "DDPM": ("ddpm", False),
}
_ALIASES = {"".join(k.lower().split()): v for k, v in A1111_NAMES.items()}


def resolve_sampler(name: str) -> tuple[str, bool]:
    """editlab name or AUTOMATIC1111 name ("DPM++ 2M Karras", any case and spacing) -> (sampler, karras)."""
    if name in SAMPLER_CLASSES:
        return name, False
    key = "".join(name.lower().replace("_", " ").split())
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
                     f"(or an AUTOMATIC1111 name such as \"DPM++ 2M Karras\")")


def _supporting(flag: str) -> str:
    return ", ".join(n for n, c in SAMPLER_CLASSES.items() if getattr(c, flag))


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    spacing: str | None = None,
    *,
    karras: bool = False,
    steps_offset: int = 1,
    final_alpha_one: bool = False,
) -> Sampler:
    """Build a sampler by name (editlab or AUTOMATIC1111 name). eta applies to "ddim" only; spacing=None picks
    the sampler's default grid ("leading" for ddim/ddpm/pndm, "linspace" for the others, as diffusers);
    karras spaces σ as Karras et al. (σ samplers and solvers); ``schedule.zero_terminal_snr`` needs a sampler
    that supports it. Unsupported combinations raise a one-line ValueError naming what is supported."""
    name, alias_karras = resolve_sampler(name)
    karras = karras or alias_karras
    cls = SAMPLER_CLASSES[name]
    if name != "ddim" and eta != 0.0:
        raise ValueError(f"eta={eta} applies to 'ddim' only; {name!r} has fixed stochasticity, leave eta at 0")
    spacing = spacing or cls.default_spacing
    if spacing not in cls.spacings:
        raise ValueError(f"{name} supports spacing {', '.join(cls.spacings)}, not {spacing!r}")
    if karras and not cls.karras:
        raise ValueError(f"{name} has no Karras σ spacing; Karras σ works with {_supporting('karras')}")
    if schedule.zero_terminal_snr and not cls.zero_snr:
        raise ValueError(f"{name} cannot sample a zero-terminal-SNR schedule (rescaled betas); use one of "
                         f"{_supporting('zero_snr')}")
    kwargs = dict(spacing=spacing, steps_offset=steps_offset)
    if cls.karras:
        kwargs["karras"] = karras
    if name in ("ddim", "pndm", "plms"):
        kwargs["final_alpha_one"] = final_alpha_one
    if name == "ddim":
        return DDIMSampler(schedule, num_steps, eta, prediction_type, **kwargs)
    if name == "dpm++2m-sde":
        kwargs["sde"] = True
    return cls(schedule, num_steps, prediction_type, **kwargs)


__all__ = [
    "SAMPLERS", "SAMPLER_CLASSES", "DIFFUSERS_NAMES", "A1111_NAMES", "PREDICTION_TYPES", "SPACINGS",
    "EULER_SPACINGS", "NoiseSchedule", "Sampler", "SigmaSampler", "SolverSampler", "DDIMSampler", "DDPMSampler",
    "EulerSampler", "EulerAncestralSampler", "HeunSampler", "LMSSampler", "DPMSolverSampler", "UniPCSampler",
    "PNDMSampler", "PLMSSampler", "make_sampler", "resolve_sampler", "check_prediction_type", "predict_eps_x0",
    "velocity", "q_sample", "training_target", "ddim_sigma", "ddim_update", "ddpm_posterior", "gaussian_noise",
    "karras_sigmas", "leading_timesteps", "linspace_timesteps", "log_linear_timesteps", "log_linear_sigma_grid",
    "sigma_grid", "sampler_from_config", "standard_scheduler_config", "source_scheduler_config",
    "scheduler_config_json",
]
