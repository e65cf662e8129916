"""editlab train-toy: train the bundled toy latent diffusion model from scratch (ldm/toy/train.py).

The VAE first (--stage vae: 1600 steps, about 11 minutes on a quiet 2-core CPU), then the text encoder and
UNet (--stage diffusion: 7000 steps, about 39 minutes there); --stage all runs both. On a machine shared with
other jobs, --threads 1 avoids thread oversubscription (2 threads then crawl). Interrupted runs continue
with --resume. The toy InstructPix2Pix model is made from the result by make-pairs and train-ip2p (README).

Two more stages build on a trained toy model, the one in --out or else the bundled one (copied into --out,
since the files made next read it from beside them):
--stage clip trains the toy CLIP (ldm/toy/clip.py) into OUT/toy-clip.safetensors; --stage ip-adapter trains
the toy IP-Adapter (controls/ip_adapter_train.py) on that CLIP's image tower into OUT/toy-ip-adapter.safetensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ldm.toy.train import STAGES, ToyRecipe, train_toy

from ..options import TOY_WEIGHTS

EXTRA_STAGES = ("clip", "ip-adapter")  # built on a trained toy model
STAGE_FILES = {"vae": ("vae.safetensors", "vae-checkpoint.pt"),
               "diffusion": ("toy-sd.safetensors", "diffusion-checkpoint.pt")}  # what each stage writes in --out

NAME = "train-toy"
HELP = "train the toy latent diffusion model (64x64 shapes) from scratch"


def add_arguments(parser):
    defaults = ToyRecipe()
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for checkpoints, vae.safetensors and the final toy-sd.safetensors")
    parser.add_argument("--stage", choices=STAGES + EXTRA_STAGES, default="all",
                        help="vae, diffusion or all: the toy model; clip, ip-adapter: its toy CLIP and IP-Adapter")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and per-step draws")
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed, help="the rendered shapes")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps of the stage (default: text encoder + UNet {defaults.steps}, toy CLIP and "
                             "IP-Adapter: their recipes')")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--force", action="store_true", help="start over, replacing an earlier run's files in --out")
    parser.set_defaults(out_is_folder=True)


def run(args):
    if args.stage in EXTRA_STAGES:
        return run_extra_stage(args)
    args.steps = ToyRecipe().steps if args.steps is None else args.steps
    if args.vae_steps < 1 or args.steps < 1:
        raise ValueError(f"--vae-steps {args.vae_steps} and --steps {args.steps}: give at least 1 each")
    written = {"vae": STAGE_FILES["vae"], "diffusion": STAGE_FILES["diffusion"],
               "all": STAGE_FILES["vae"] + STAGE_FILES["diffusion"]}[args.stage]
    existing = [name for name in written if (args.out / name).exists()]
    if existing and not (args.force or args.resume):
        raise FileExistsError(f"{args.out} holds an earlier run ({', '.join(existing)}); pass --resume to continue "
                              "it, --force to start over, or choose another --out")
    recipe = dataclasses.replace(ToyRecipe(), seed=args.seed, data_seed=args.data_seed,
                                 vae_steps=args.vae_steps, steps=args.steps)
    print(train_toy(args.out, recipe, stage=args.stage, resume=args.resume, force=args.force))


def run_extra_stage(args):
    """The toy CLIP or the toy IP-Adapter, on OUT/toy-sd.safetensors (copied from the bundled model if absent)."""
    import shutil

    from ldm.toy.clip import ClipRecipe, train_toy_clip

    from controls.ip_adapter_train import AdapterRecipe, train_toy_ip_adapter
    from weights_convert.clip_vision import load_image_encoder

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give at least 1")
    base = args.out / TOY_WEIGHTS.name
    if not base.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(TOY_WEIGHTS, base)  # the toy CLIP reads its text tower from the file beside it
    if args.stage == "clip":
        recipe = dataclasses.replace(ClipRecipe(), seed=args.seed, steps=args.steps or ClipRecipe().steps)
        print(train_toy_clip(args.out, base, recipe, resume=args.resume))
        return
    clip = args.out / "toy-clip.safetensors"
    if not clip.is_file():
        raise FileNotFoundError(f"{clip} not found; run --stage clip first (or copy the bundled toy-clip.safetensors "
                                "into --out)")
    recipe = dataclasses.replace(AdapterRecipe(), seed=args.seed, steps=args.steps or AdapterRecipe().steps)
    encoder, _ = load_image_encoder(clip)
    print(train_toy_ip_adapter(args.out, base, encoder, clip, recipe, resume=args.resume))
