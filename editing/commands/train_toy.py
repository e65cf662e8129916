"""editlab train-toy: train the bundled toy latent diffusion model from scratch (ldm/toy/train.py).

The VAE first (--stage vae: 1600 steps, about 11 minutes on a quiet 2-core CPU), then the text encoder and
UNet (--stage diffusion: 7000 steps, about 39 minutes there); --stage all runs both. On a machine shared with
other jobs, --threads 1 avoids thread oversubscription (2 threads then crawl). Interrupted runs continue
with --resume. The toy InstructPix2Pix model is made from the result by make-pairs and train-ip2p (README).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from ldm.toy.train import STAGES, ToyRecipe, train_toy

STAGE_FILES = {"vae": ("vae.safetensors", "vae-checkpoint.pt"),
               "diffusion": ("toy-sd.safetensors", "diffusion-checkpoint.pt")}  # what each stage writes in --out

NAME = "train-toy"
HELP = "train the toy latent diffusion model (64x64 shapes) from scratch"


def add_arguments(parser):
    defaults = ToyRecipe()
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for checkpoints, vae.safetensors and the final toy-sd.safetensors")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and per-step draws")
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed, help="the rendered shapes")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="text encoder + UNet steps")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--force", action="store_true", help="start over, replacing an earlier run's files in --out")
    parser.set_defaults(out_is_folder=True)


def run(args):
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
    print(train_toy(args.out, recipe, stage=args.stage, resume=args.resume))
