"""Command-line options of SDXL's size and crop micro-conditioning (``--original-size H W``,
``--crop-top-left TOP LEFT``, ``--target-size H W``; for the refiner ``--aesthetic-score`` and
``--negative-aesthetic-score`` instead of the target size), shared by the sampling commands.

Defaults are diffusers': original and target size = the output size, crop (0, 0). They are SDXL inputs;
given to an SD 1.x/2.x model they are an error rather than silently ignored.
"""

from __future__ import annotations

import argparse

from ldm.model import StableDiffusion
from ldm.sdxl import MicroConditioning


def add_micro_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDXL micro-conditioning (SDXL models only)")
    group.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="size the model is told the training image had (default: the output size)")
    group.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                       help="top-left corner of the training crop the model is told about (default: 0 0)")
    group.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="size the model is asked to produce (default: the output size; base model only)")
    group.add_argument("--aesthetic-score", type=float, default=None,
                       help="SDXL refiner: aesthetic score the prompt branch is conditioned on (default: 6.0)")
    group.add_argument("--negative-aesthetic-score", type=float, default=None,
                       help="SDXL refiner: aesthetic score of the negative branch (default: 2.5)")


def micro_conditioning(args, model: StableDiffusion) -> MicroConditioning | None:
    """The MicroConditioning the options give (None for SD 1.x/2.x models); a one-line error for bad ones."""
    given = {name: getattr(args, name.replace("-", "_"), None) for name in ("original-size", "crop-top-left", "target-size")}
    scores = {name: getattr(args, name.replace("-", "_"), None) for name in ("aesthetic-score", "negative-aesthetic-score")}
    if not model.is_sdxl:
        used = [f"--{name}" for name, value in {**given, **scores}.items() if value is not None]
        if used:
            raise ValueError(f"{', '.join(used)}: SDXL micro-conditioning, but this is an {model.config.family} model; drop it")
        return None
    if model.is_sdxl_refiner and given["target-size"] is not None:
        raise ValueError("--target-size: the SDXL refiner is conditioned on an aesthetic score instead; drop it "
                         "(use --aesthetic-score / --negative-aesthetic-score)")
    if not model.is_sdxl_refiner and any(v is not None for v in scores.values()):
        raise ValueError("--aesthetic-score / --negative-aesthetic-score: only the SDXL refiner is conditioned on an "
                         "aesthetic score; drop them for the base model")
    for name, value in given.items():
        if value is not None and (min(value) < 0 or (name != "crop-top-left" and min(value) == 0)):
            raise ValueError(f"--{name} {value[0]} {value[1]}: give positive sizes (crops may be 0)")
    return MicroConditioning(original_size=tuple(given["original-size"]) if given["original-size"] else None,
                             crop_top_left=tuple(given["crop-top-left"] or (0, 0)),
                             target_size=tuple(given["target-size"]) if given["target-size"] else None,
                             **{name.replace("-", "_"): value for name, value in scores.items() if value is not None})


def sdxl_parameters(micro: MicroConditioning | None, height: int, width: int, negative: str | None,
                    refiner: bool = False) -> dict:
    """What a PNG records about SDXL's extra inputs: the six numbers (the refiner's five: sizes, crop and both
    aesthetic scores), and whether the negative branch was zeroed (no negative prompt; never for the refiner)
    rather than an encoded empty prompt."""
    if micro is None:
        return {}
    return {**micro.as_dict(height, width, refiner), "negative_zeroed": negative is None and not refiner}
