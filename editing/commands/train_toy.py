"""editlab train-toy: train the bundled toy latent diffusion model from scratch (ldm/toy/train.py).

The VAE first (--stage vae: 1600 steps, about 11 minutes on a quiet 2-core CPU), then the text encoder and
UNet (--stage diffusion: 7000 steps, about 39 minutes there); --stage all runs both. On a machine shared with
other jobs, --threads 1 avoids thread oversubscription (2 threads then crawl). Interrupted runs continue
with --resume. The toy InstructPix2Pix model is made from the result by make-pairs and train-ip2p (README).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ldm.interrupt import check_fresh_start
from ldm.toy.train import STAGES, ToyRecipe, train_toy

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
    parser.add_argument("--force", action="store_true", help="start over an interrupted run's checkpoints in --out")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is fastest on a busy machine")


def run(args):
    if args.vae_steps < 1 or args.steps < 1:
        raise ValueError(f"--vae-steps {args.vae_steps} and --steps {args.steps}: give at least 1 each")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(ToyRecipe(), seed=args.seed, data_seed=args.data_seed,
                                 vae_steps=args.vae_steps, steps=args.steps)
    if not args.resume and not args.force:  # an interrupted run's checkpoints are not overwritten silently
        for name in ("vae-checkpoint.pt", "diffusion-checkpoint.pt"):
            check_fresh_start(args.out / name, False, False)
    print(train_toy(args.out, recipe, stage=args.stage, resume=args.resume, force=args.force))
