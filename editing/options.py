"""Options shared by the editlab subcommands: weights, device and dtype, sampling, outputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ldm
from ldm.files import file_sha256
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, sampler_for
from ldm.schedulers import A1111_NAMES, SAMPLERS, SPACINGS, resolve_sampler
from ldm.speed import apply_backend_settings

TOY_WEIGHTS = Path(ldm.__file__).parent / "toy" / "weights" / "toy-sd.safetensors"
TOY_IP2P_WEIGHTS = TOY_WEIGHTS.with_name("toy-ip2p.safetensors")  # its UNet only; VAE and text from TOY_WEIGHTS
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


def _sampler_name(name: str) -> str:
    try:
        resolve_sampler(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def add_sampler_arguments(parser: argparse.ArgumentParser, scheduler: str = "ddim",
                          extra_spacings: tuple[str, ...] = ()) -> None:
    """The sampling options every sampling command shares, in one group: sampler, grid, Karras σ, zero-SNR
    betas, guidance rescale and the negative prompt."""
    group = parser.add_argument_group("sampling options")
    group.add_argument("--scheduler", type=_sampler_name, default=scheduler, metavar="NAME",
                       help=f"sampler: {', '.join(SAMPLERS)}; AUTOMATIC1111 names work too "
                            f"(e.g. 'DPM++ 2M Karras', 'Euler a') (default: {scheduler})")
    group.add_argument("--spacing", choices=SPACINGS + extra_spacings, default=None,
                       help="timestep grid (default: the model's scheduler config, else the sampler's own: leading "
                            "for ddim/ddpm/pndm, linspace for the others)")
    group.add_argument("--karras", action="store_true", default=None,
                       help="Karras σ spacing, ρ = 7 (euler, heun, lms, dpm++2m, dpm++2m-sde, unipc)")
    group.add_argument("--rescale-zero-snr", action="store_true", default=None,
                       help="rescale the betas to zero terminal SNR (Lin et al.; v-prediction models, with "
                            "--spacing trailing and --guidance-rescale 0.7)")
    group.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                       help="rescale the guided output towards the conditional one's std (Lin et al.: 0.7); 0: off")
    group.add_argument("--negative", default=None, help="negative prompt (default: empty)")


def add_sampling_arguments(parser: argparse.ArgumentParser, steps: int = 50, guidance: float = 7.5,
                           scheduler: str = "ddim", size: int | None = None) -> None:
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale w")
    add_sampler_arguments(parser, scheduler)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 stochastic)")
    parser.add_argument("--seed", type=int, default=0)
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


def load_model(args) -> StableDiffusion:
    if args.dtype != "fp32" and args.device == "cpu":
        raise UserError(f"--dtype {args.dtype} needs a GPU (--device cuda); use fp32 on the CPU")
    apply_backend_settings(args.device)  # torch.backends flags chosen for the device (ldm/speed.py)
    return StableDiffusion.load(weights_path(args), device=args.device, dtype=DTYPES[args.dtype])


def native_size(model: StableDiffusion) -> int:
    """Default image side: 512 for SD 1.x/2.x and the model's training size for the toy model."""
    return {"toy": 64}.get(model.config.family, 512)


def sampler_options(args) -> dict:
    """The shared sampling options as SamplingConfig fields (an AUTOMATIC1111 name resolved to sampler + Karras)."""
    name, karras = resolve_sampler(args.scheduler)
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UserError(f"--guidance-rescale {args.guidance_rescale}: give a value in [0, 1] (Lin et al.: 0.7)")
    return dict(scheduler=name, spacing=args.spacing, karras=True if (karras or args.karras) else None,
                rescale_zero_snr=args.rescale_zero_snr, guidance_rescale=args.guidance_rescale)


def check_sampler(model: StableDiffusion, cfg: SamplingConfig) -> None:
    """Build the sampler once, so an unsupported combination is a one-line error before any work."""
    try:
        sampler_for(model, cfg)
    except ValueError as err:
        raise UserError(str(err)) from None


def sampling_config(args, model: StableDiffusion) -> SamplingConfig:
    side = native_size(model)
    cfg = SamplingConfig(steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed,
                         height=args.height or side, width=args.width or side, **sampler_options(args))
    check_sampler(model, cfg)
    return cfg


def run_parameters(args, cfg: SamplingConfig, **extra) -> dict:
    """What a PNG records about the run that made it."""
    path = weights_path(args)
    return {"weights": path.name, "weights_sha256": file_sha256(path), "scheduler": cfg.scheduler,
            "spacing": cfg.spacing, "karras": cfg.karras, "rescale_zero_snr": cfg.rescale_zero_snr,
            "guidance_rescale": cfg.guidance_rescale,
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
