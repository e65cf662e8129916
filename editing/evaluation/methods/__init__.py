"""Method adapters: from a case and a method's parameters to an edited image (``MethodOutput``).

``METHODS`` maps each name to its parameter dataclass (the defaults, and what a sweep may change) and its
runner ``run(resources, case, params, seed)``. An adapter that cannot run a case raises ``CannotRun`` with
the reason, which the results row records instead of metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

from .base import CannotRun, MethodOutput, Resources
from .instructed import (ControlNetParams, IP2PParams, StyleParams, VisiiParams, run_controlnet, run_ip2p, run_style,
                         run_visii)
from .text_guided import DDPMParams, P2PParams, SDEditParams, run_ddpm, run_p2p, run_sdedit


@dataclass(frozen=True)
class Method:
    name: str
    params: type  # a frozen dataclass of the method's parameters with their defaults
    run: Callable  # run(resources, case, params, seed) -> MethodOutput
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("p2p-ddim", P2PParams, partial(run_p2p, inversion="ddim"), "Prompt-to-Prompt on DDIM inversion"),
    Method("p2p-null-text", P2PParams, partial(run_p2p, inversion="null-text"),
           "Prompt-to-Prompt on null-text inversion"),
    Method("ddpm-edit", DDPMParams, partial(run_ddpm, p2p=False), "edit-friendly DDPM inversion"),
    Method("ddpm-p2p", DDPMParams, partial(run_ddpm, p2p=True), "edit-friendly DDPM inversion + Prompt-to-Prompt"),
    Method("sdedit", SDEditParams, run_sdedit, "SDEdit"),
    Method("ip2p", IP2PParams, run_ip2p, "InstructPix2Pix"),
    Method("visii", VisiiParams, run_visii, "Visii (instruction learned from the case's pair)"),
    Method("controlnet", ControlNetParams, run_controlnet, "ControlNet, hint from the case (Canny; toy: mask)"),
    Method("ip-adapter", StyleParams, partial(run_style, instant=False), "IP-Adapter, a case image as style image"),
    Method("instant-style", StyleParams, partial(run_style, instant=True), "InstantStyle, a case image as style"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_value(method: Method, name: str, text: str):
    """A parameter value from text, typed as the parameter's default."""
    fields = {f.name: f for f in dataclasses.fields(method.params)}
    if name not in fields:
        raise ValueError(f"method {method.name} has no parameter {name!r}; its parameters: {', '.join(fields)}")
    default = fields[name].default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise ValueError(f"{method.name}.{name}={text!r}: expected a {type(default).__name__} "
                         f"(default {default!r})") from None


__all__ = ["CannotRun", "METHODS", "Method", "MethodOutput", "Resources", "get_method", "parse_value"]
