"""``editlab convert SRC DST``: any Stable Diffusion checkpoint into editlab's weights format.

SRC is an LDM single file (.ckpt / .safetensors of SD 1.x, SD 2.x, InstructPix2Pix or SDXL base), a diffusers pipeline
folder, or an editlab file (to swap its VAE with --vae). The layout and model type are detected; the
prediction type must be given for SD 2.x single files (it is not stored in the weights).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ldm.config import PRESETS

from ..errors import UserError

NAME = "convert"
HELP = "convert a checkpoint (LDM .ckpt/.safetensors, diffusers folder) into editlab's weights format"

log = logging.getLogger(__name__)

DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file, diffusers folder, or editlab file (with --vae)")
    parser.add_argument("dst", type=Path, help="output .safetensors file (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--layout", choices=["ldm", "diffusers", "editlab", "vae"],
                        help="source layout (default: detected from the content)")
    parser.add_argument("--model", choices=["sd1", "sd2", "ip2p", "sdxl", "sdxl-refiner"],
                        help="model type (default: detected)")
    parser.add_argument("--prediction", choices=["epsilon", "v_prediction"],
                        help="what the UNet predicts; required for SD 2.x single files (768-v: v_prediction)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="use the UNet's EMA copy (default: yes for InstructPix2Pix, no otherwise)")
    parser.add_argument("--vae", metavar="VAE_FILE", help="standalone VAE (file or diffusers vae/ folder) to swap in")
    parser.add_argument("--config", metavar="PRESET_OR_FILE",
                        help="what a single file cannot say (head counts, GroupNorm groups, ...): a preset "
                             f"({', '.join(sorted(PRESETS))}; the shapes still come from the file), or a config "
                             "file: an editlab config JSON, a diffusers model folder or config.json, or the "
                             "original LDM .yaml (v1-inference.yaml, v2-inference-v.yaml, generate.yaml, "
                             "cldm_v15.yaml)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="store tensors as (default: keep)")
    parser.set_defaults(out_is_folder=False)


def check_destination(dst: Path, force: bool) -> None:
    """DST is a new .safetensors file (editlab's format is safetensors, whatever the name says), or --force."""
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: editlab weights are safetensors; name the output {dst.with_suffix('.safetensors')}")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; choose another name or pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    from weights_convert import convert  # imported here: the CLI lists every command at start-up

    check_destination(args.dst, args.force)
    preset = config = None
    if args.config in PRESETS:
        preset = PRESETS[args.config]()
    elif args.config is not None:
        config = Path(args.config)
        if not config.exists():
            raise UserError(f"--config {args.config}: neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                            "existing file or folder")
    report = convert(args.src, args.dst, layout=args.layout, model=args.model, prediction=args.prediction,
                     ema=args.ema, vae=args.vae, config=config, preset=preset, dtype=DTYPES[args.dtype])
    log.info(report.summary())
    log.info("wrote %s", args.dst)
    return 0
