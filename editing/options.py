"""Options shared by the editlab subcommands: weights, device and dtype, sampling, outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ldm
from ldm.files import file_sha256
from ldm.model import StableDiffusion, metadata_of
from ldm.pipeline import SamplingConfig
from ldm.schedulers import SAMPLERS
from ldm.speed import apply_backend_settings

TOY_WEIGHTS = Path(ldm.__file__).parent / "toy" / "weights" / "toy-sd.safetensors"
TOY_IP2P_WEIGHTS = TOY_WEIGHTS.with_name("toy-ip2p.safetensors")  # its UNet only; VAE and text from TOY_WEIGHTS
TOY_CLIP_WEIGHTS = TOY_WEIGHTS.with_name("toy-clip.safetensors")  # image tower; text tower from TOY_WEIGHTS
TOY_IP_ADAPTER_WEIGHTS = TOY_WEIGHTS.with_name("toy-ip-adapter.safetensors")  # its encoder: TOY_CLIP_WEIGHTS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UserError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser, what: str = "a Stable Diffusion model",
                        toy: Path = TOY_WEIGHTS) -> None:
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"editlab weights file of {what} (made by 'editlab convert'); "
                             f"default: the bundled {toy.stem} model")
    parser.set_defaults(toy_weights=toy)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="UNet and text encoder precision (the VAE always runs in fp32)")


def add_sampling_arguments(parser: argparse.ArgumentParser, steps: int = SamplingConfig.steps,
                           guidance: float = SamplingConfig.guidance, scheduler: str = SamplingConfig.scheduler,
                           size: int | None = None) -> None:
    """Defaults: ``SamplingConfig``'s (the Python API's), unless a command passes its own."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale w")
    parser.add_argument("--scheduler", choices=SAMPLERS, default=scheduler)
    parser.add_argument("--eta", type=float, default=SamplingConfig.eta,
                        help="DDIM eta (0 deterministic, 1 stochastic)")
    parser.add_argument("--seed", type=int, default=SamplingConfig.seed)
    parser.add_argument("--height", type=int, default=size, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=size, help="default: the model's native size")


def add_output_arguments(parser: argparse.ArgumentParser, suffix: str = ".png") -> None:
    parser.add_argument("--out", type=Path, required=True, help=f"output {'file' if suffix else 'folder'}")
    parser.add_argument("--force", action="store_true", help="overwrite outputs of another run")


def weights_path(args) -> Path:
    path = args.weights or getattr(args, "toy_weights", TOY_WEIGHTS)
    if not path.is_file():
        hint = ("the bundled toy model is missing from this install" if args.weights is None
                else "convert a checkpoint first: editlab convert CHECKPOINT OUT.safetensors")
        raise UserError(f"weights file {path} not found; {hint}")
    return path


def toy_default(args, given: Path | None, toy_file: Path, flag: str) -> Path:
    """``given``, or the bundled toy file when the weights are a toy-world model (family "toy")."""
    if given is not None:
        return given
    path = weights_path(args)
    try:
        family = json.loads(metadata_of(path).get("config", "{}")).get("family")
    except Exception:  # not a safetensors file: loading the model reports it
        family = None
    if family != "toy":
        raise UserError(f"{flag} is needed with {path.name} (the bundled {toy_file.name} fits only the toy model)")
    if not toy_file.is_file():
        raise UserError(f"{toy_file} is missing from this install; remake it with editlab train-toy or pass {flag}")
    return toy_file


def load_model(args) -> StableDiffusion:
    if args.dtype != "fp32" and args.device == "cpu":
        raise UserError(f"--dtype {args.dtype} needs a GPU (--device cuda); use fp32 on the CPU")
    apply_backend_settings(args.device)  # torch.backends flags chosen for the device (ldm/speed.py)
    return StableDiffusion.load(weights_path(args), device=args.device, dtype=DTYPES[args.dtype])


def native_size(model: StableDiffusion) -> int:
    """Default image side: 512 for SD 1.x/2.x, 1024 for SDXL, the training size for the toy model."""
    return {"toy": 64, "sdxl": 1024}.get(model.config.family, 512)


def sampling_config(args, model: StableDiffusion) -> SamplingConfig:
    side = native_size(model)
    return SamplingConfig(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, eta=args.eta,
                          seed=args.seed, height=args.height or side, width=args.width or side)


def run_parameters(args, cfg: SamplingConfig, **extra) -> dict:
    """What a PNG records about the run that made it."""
    path = weights_path(args)
    return {"weights": path.name, "weights_sha256": file_sha256(path), "scheduler": cfg.scheduler,
            "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta, "seed": cfg.seed,
            "height": cfg.height, "width": cfg.width, "dtype": args.dtype, **extra}


def check_training_output(args) -> None:
    """The checks every training command makes first: --out is a .safetensors file that does not exist yet
    (unless --force or --resume), and training runs in fp32."""
    if args.out.suffix != ".safetensors":
        raise ValueError(f"{args.out}: the output must be a .safetensors file")
    if args.out.exists() and not args.force and not args.resume:
        raise FileExistsError(f"{args.out} exists; choose another --out or pass --force")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype}: train in fp32")
