"""Options shared by the editlab subcommands: weights, device and dtype, sampling, outputs."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ldm
from ldm.files import file_sha256
from ldm.model import StableDiffusion, metadata_of
from ldm.pipeline import SamplingConfig, sampler_for
from ldm.schedulers import SAMPLERS, SPACINGS, resolve_sampler
from ldm.speed import apply_backend_settings

from .checks import check_converted, check_weights, native_side, weights_kind
from .errors import UserError  # noqa: F401  (re-exported: the commands raise it)

TOY_WEIGHTS = Path(ldm.__file__).parent / "toy" / "weights" / "toy-sd.safetensors"
TOY_IP2P_WEIGHTS = TOY_WEIGHTS.with_name("toy-ip2p.safetensors")  # its UNet only; VAE and text from TOY_WEIGHTS
TOY_CLIP_WEIGHTS = TOY_WEIGHTS.with_name("toy-clip.safetensors")  # image tower; text tower from TOY_WEIGHTS
TOY_IP_ADAPTER_WEIGHTS = TOY_WEIGHTS.with_name("toy-ip-adapter.safetensors")  # its encoder: TOY_CLIP_WEIGHTS
log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_arguments(parser: argparse.ArgumentParser, what: str = "a Stable Diffusion model",
                        toy: Path = TOY_WEIGHTS, needs: str = "text-to-image", prompts: bool = True) -> None:
    """--weights (checked against ``needs``: text-to-image, editor or any-model), --device, --dtype and, for
    commands that read a prompt, --embedding."""
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"{what}: an editlab weights file (made by 'editlab convert'), or a diffusers folder "
                             f"or original .ckpt/.safetensors file (converted in memory); default: the bundled "
                             f"{toy.stem} model")
    parser.set_defaults(toy_weights=toy, model_needs=needs)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs: cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="UNet and text encoder precision (the VAE always runs in fp32)")
    if prompts:
        parser.add_argument("--embedding", type=Path, action="append", default=[], metavar="FILE",
                            help="textual-inversion embedding to load (editlab, diffusers learned_embeds or "
                                 "AUTOMATIC1111 .pt/.safetensors); its token may then appear in prompts; repeatable")


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
    group.add_argument("--negative", default=None,
                       help="negative prompt (default: empty; SDXL: zero conditioning, as diffusers)")


def add_sampling_arguments(parser: argparse.ArgumentParser, steps: int = SamplingConfig.steps,
                           guidance: float = SamplingConfig.guidance, scheduler: str = SamplingConfig.scheduler,
                           size: int | None = None) -> None:
    """Defaults: ``SamplingConfig``'s (the Python API's), unless a command passes its own."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale w")
    add_sampler_arguments(parser, scheduler)
    parser.add_argument("--eta", type=float, default=SamplingConfig.eta,
                        help="DDIM eta (0 deterministic, 1 stochastic)")
    parser.add_argument("--seed", type=int, default=SamplingConfig.seed)
    parser.add_argument("--height", type=int, default=size, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=size, help="default: the model's native size")


def add_output_arguments(parser: argparse.ArgumentParser, suffix: str = ".png") -> None:
    parser.add_argument("--out", type=Path, required=True, help=f"output {'file' if suffix else 'folder'}")
    parser.add_argument("--force", action="store_true", help="overwrite outputs of another run")
    parser.set_defaults(out_is_folder=not suffix)


def weights_path(args) -> Path:
    path = args.weights or getattr(args, "toy_weights", TOY_WEIGHTS)
    if not path.exists():
        hint = ("the bundled toy model is missing from this install" if args.weights is None
                else "give an editlab weights file, a diffusers folder or an original checkpoint file")
        raise UserError(f"weights {path} not found; {hint}")
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
    """The model of --weights (an editlab file, or a checkpoint converted in memory), checked against what the
    command needs, with every --embedding installed."""
    if args.dtype != "fp32" and args.device == "cpu":
        raise UserError(f"--dtype {args.dtype} needs a GPU (--device cuda); use fp32 on the CPU")
    apply_backend_settings(args.device)  # torch.backends flags chosen for the device (ldm/speed.py)
    path = weights_path(args)
    needs, command = getattr(args, "model_needs", "text-to-image"), getattr(args, "command", "?")
    if check_weights(path, needs, command) is None and weights_kind(path)[0] == "checkpoint":
        from weights_convert import load_converted, to_model  # imported here: slow, and rarely needed

        converted = load_converted(path)
        log.info("converted %s in memory: %s", path, converted.report.summary())
        check_converted(converted.config, path, needs, command)
        model = to_model(converted).to(args.device)
        model.unet.use_channels_last()  # as StableDiffusion.load: the same kernels, the same pixels
        if args.dtype != "fp32":
            model.unet.to(DTYPES[args.dtype])
            model.text_encoder.to(DTYPES[args.dtype])
    else:
        model = StableDiffusion.load(path, device=args.device, dtype=DTYPES[args.dtype])
    for embedding in getattr(args, "embedding", None) or []:
        from inversion.textual_inversion import load_textual_inversion

        token = load_textual_inversion(model, embedding, embedding_token(embedding))
        log.debug("embedding %s: token %s", embedding, token)
    return model


def load_input_image(args, model: StableDiffusion, path) -> torch.Tensor:
    """The input image of an image-to-image command as [1, 3, H, W] in [0, 1]: its own size, or resized to
    --width/--height; a size the model cannot take is refused with the flags that fix it."""
    from ldm.images import read_rgb

    image = read_rgb(path)
    width, height = args.width or image.size[0], args.height or image.size[1]
    factor = model.config.vae.downsample_factor
    if width % factor or height % factor:
        fixed = max(factor, width // factor * factor), max(factor, height // factor * factor)
        given = "" if (width, height) == image.size else f" (resized to {width}x{height})"
        raise UserError(f"{path}: {image.size[0]}x{image.size[1]} pixels{given}; this model needs sides that are "
                        f"multiples of {factor}: pass --width {fixed[0]} --height {fixed[1]} to resize it")
    if (width, height) != image.size:
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # [H, W, 3] -> [1, 3, H, W]


def embedding_token(path: Path) -> str:
    """The token an embedding file defines: the name stored in it, else (A1111 files) the file's stem."""
    from inversion.textual_inversion import read_embedding_file

    name, _ = read_embedding_file(path)
    return name or path.stem


def native_size(model: StableDiffusion) -> int:
    """Default image side: 512 for SD 1.x/2.x, 1024 for SDXL, the training size for the toy model."""
    return native_side(model.config)


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
    return {"weights": path.name, "weights_sha256": weights_sha256(path), **run_settings(args),
            "scheduler": cfg.scheduler, "spacing": cfg.spacing, "karras": cfg.karras,
            "rescale_zero_snr": cfg.rescale_zero_snr, "guidance_rescale": cfg.guidance_rescale,
            "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta, "seed": cfg.seed,
            "height": cfg.height, "width": cfg.width, "dtype": args.dtype, **extra}


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, or of a diffusers folder's weight files."""
    if path.is_dir():
        from weights_convert.files import sha256_of

        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        return sha256_of(files, path)
    return file_sha256(path)


def run_settings(args) -> dict:
    """What every output records besides the method's parameters: threads (and batch size: CPU kernels may
    round differently with either) and the embeddings loaded."""
    settings = {"threads": torch.get_num_threads()}
    if getattr(args, "batch", None) is not None:
        settings["batch"] = args.batch
    if getattr(args, "embedding", None):
        settings["embeddings"] = {embedding_token(p): file_sha256(p) for p in args.embedding}
    return settings


def check_training_output(args) -> None:
    """The checks every training command makes first: --out is a .safetensors file that does not exist yet
    (unless --force or --resume), and training runs in fp32."""
    if args.out.suffix != ".safetensors":
        raise ValueError(f"{args.out}: the output must be a .safetensors file")
    if args.out.exists() and not args.force and not args.resume:
        raise FileExistsError(f"{args.out} exists; choose another --out or pass --force")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype}: train in fp32")
