"""A model's own schedule: the scheduler config that travels with its weights, read as diffusers reads it.

``editlab convert`` stores the keys a diffusers folder's scheduler/scheduler_config.json sets (betas, spacing,
steps offset, prediction type, zero-SNR rescale, …) in the weights metadata; a single file gets its family's
standard config (the SD 1.x/2.x folders' values, which set no spacing). Sampling then follows diffusers'
``X.from_config(folder config)``: a key the folder sets applies to every sampler, a key it does not set takes
the sampler's own default (e.g. no "timestep_spacing": DDIM/DDPM/PNDM use "leading", the others "linspace"),
and the user's flags override both.
"""

from __future__ import annotations

import json

from .schedule import NoiseSchedule

# the keys editlab reads; everything else in a scheduler config is left behind
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "timestep_spacing", "steps_offset", "prediction_type", "rescale_betas_zero_snr",
                  "set_alpha_to_one", "use_karras_sigmas", "_class_name")
STANDARD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
            "clip_sample": False}  # SD 1.x/2.x scheduler_config.json (PNDM/DDIM)


def standard_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """What a single file of SD 1.x/2.x (and the toy model, trained on the same schedule) samples with."""
    return {**STANDARD, "prediction_type": prediction_type}


def source_scheduler_config(raw: dict) -> dict:
    """The keys of a diffusers scheduler config that editlab reads, as the file sets them (keys diffusers
    recorded as defaults, "_use_default_values", count as unset)."""
    defaults = set(raw.get("_use_default_values", ()))
    return {k: raw[k] for k in SCHEDULER_KEYS if k in raw and k not in defaults}


def scheduler_config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def sampler_from_config(name: str, config: dict, num_steps: int, eta: float = 0.0,
                        prediction_type: str | None = None, spacing: str | None = None,
                        karras: bool | None = None, zero_terminal_snr: bool | None = None):
    """The sampler ``name`` on the schedule ``config`` describes; arguments that are not None override it.
    Karras σ from the config applies to the samplers that have it (as diffusers ignores keys a class lacks);
    asked for by argument it must be supported."""
    from . import SAMPLER_CLASSES, make_sampler, resolve_sampler

    name, alias_karras = resolve_sampler(name)
    cls = SAMPLER_CLASSES[name]
    schedule = NoiseSchedule.from_config(config, zero_terminal_snr)
    if karras is None:
        karras = alias_karras or (bool(config.get("use_karras_sigmas", False)) and cls.karras)
    prediction_type = prediction_type or config.get("prediction_type", "epsilon")
    if schedule.zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("a zero-terminal-SNR schedule (rescaled betas) needs a v-prediction model: at SNR 0 an "
                         "ε-prediction says nothing about the image; drop --rescale-zero-snr")
    return make_sampler(name, schedule, num_steps, eta, prediction_type,
                        spacing or config.get("timestep_spacing"), karras=karras,
                        steps_offset=int(config.get("steps_offset", 0)),
                        final_alpha_one=bool(config.get("set_alpha_to_one", name == "ddim")))
