"""editlab train-ip2p: fine-tune a text-to-image model into an InstructPix2Pix editor on paired data.

    editlab train-ip2p --out toy-ip2p.safetensors                       (the toy model on toy edit pairs)
    editlab train-ip2p --weights sd15.safetensors --data PAIRS_FOLDER --size 256 --out ip2p.safetensors
    torchrun --nproc_per_node 2 -m editing.cli train-ip2p ... --out ip2p.safetensors            (DDP, gloo)

The UNet's conv_in is widened to 8 channels (zero-initialised) unless the model already has them; the VAE and
text encoder stay frozen. The output file records the recipe, the data and the final loss in its metadata.
A checkpoint (default OUT.ckpt.pt) is written atomically every --checkpoint-every steps; --resume continues
from it to exactly the weights of an uninterrupted run. Under torchrun --batch is per process and the run
equals one process with batch × processes; rank 0 writes the checkpoint and the output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ldm.files import file_sha256
from ldm.training import TrainConfig, backend_for, end_processes, start_processes

from ..instruct_pix2pix.data import ToyEditPairs, pair_source
from ..instruct_pix2pix.train import IP2PTrainConfig, train_ip2p, widen_conv_in
from ..options import add_model_arguments, check_training_output, load_model, native_size, weights_path
from ..training_cli import add_scale_arguments, check_scale_arguments, data_fingerprint, recorded_options, start_checks

NAME = "train-ip2p"
HELP = "train InstructPix2Pix (instruction-following image editing) from a text-to-image model"
RECIPE = "editlab-ip2p-v1"


def add_arguments(parser):
    add_model_arguments(parser, "the text-to-image model to start from", needs="any-model", prompts=False)
    parser.add_argument("--data", default="toy",
                        help="'toy' (rendered toy edit pairs), a folder with pairs.jsonl (before, after, instruction), "
                             "or a folder of WebDataset .tar shards (KEY.before.png, KEY.after.png, KEY.txt)")
    parser.add_argument("--pairs", type=int, default=2000, help="number of toy pairs")
    parser.add_argument("--data-seed", type=int, default=1234, help="seed of the toy pairs")
    parser.add_argument("--size", type=int, default=None, help="training image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="pairs per process and step")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (paper: 1e-4, no warm-up)")
    parser.add_argument("--dropout", type=float, default=0.05, help="conditioning dropout p (paper: 0.05)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the UNet weights, saved at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="resumable checkpoint (default: OUT.ckpt.pt)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (default: a quarter of --steps, at most 500)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="output editlab weights file (.safetensors)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file, or start over an interrupted run's checkpoint")
    add_scale_arguments(parser)
    parser.add_argument("--unet-only", action="store_true",
                        help="write only the UNet; the VAE and text encoder are read from --weights, which must "
                             "sit in the folder of --out (how the toy InstructPix2Pix model ships)")
    parser.add_argument("--half", action="store_true", help="store fp16 tensors (half the file)")


def run(args):
    check_training_output(args)
    if args.unet_only and weights_path(args).resolve().parent != args.out.resolve().parent:
        raise ValueError(f"--unet-only: put {args.out.name} in the folder of --weights {weights_path(args)} "
                         "(the file refers to it by name)")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: give a number of steps >= 1")
    check_scale_arguments(args)
    checkpoint = args.checkpoint or args.out.with_suffix(".ckpt.pt")
    start_checks(checkpoint, args)
    if args.data != "toy" and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder (pairs.jsonl or .tar shards), nor 'toy'")
    rank, processes = start_processes(backend_for(args.device))  # joins the group when launched by torchrun
    base = load_model(args)
    model = base if base.config.unet.in_channels == 2 * base.config.vae.latent_channels else widen_conv_in(base)
    size = args.size or native_size(model)
    dataset = ToyEditPairs(args.pairs, args.data_seed, size) if args.data == "toy" else pair_source(args.data, size)
    train = TrainConfig(steps=args.steps, lr=args.lr, final_lr_fraction=1.0, ema_decay=args.ema_decay,
                        seed=args.seed, checkpoint_every=args.checkpoint_every or max(1, min(500, args.steps // 4)),
                        accumulate=args.accumulate, precision=args.precision)
    cfg = IP2PTrainConfig(batch=args.batch, dropout=args.dropout)
    options = recorded_options(args, ["data", "size", "steps", "lr", "dropout", "ema_decay", "seed", "precision"],
                               processes, weights_sha256=file_sha256(weights_path(args)), size_used=size,
                               data_sha256=data_fingerprint(args.data) if args.data != "toy" else "",
                               **({"--pairs": args.pairs, "--data-seed": args.data_seed} if args.data == "toy" else {}))
    model, losses = train_ip2p(model, dataset, train, cfg, checkpoint, resume=args.resume, workers=args.workers,
                               gradient_checkpointing=args.gradient_checkpointing, options=options, force=args.force)
    if rank == 0:
        tail = losses[-50:]
        metadata = {"recipe": RECIPE, "base": weights_path(args).name, "base_sha256": file_sha256(weights_path(args)),
                    "data": "toy" if args.data == "toy" else Path(args.data).name, "pairs": str(len(dataset)),
                    "data_seed": str(args.data_seed), "size": str(size), "steps": str(args.steps),
                    "processes": str(processes),
                    "settings": json.dumps({"batch": args.batch, "lr": args.lr, "dropout": args.dropout,
                                            "ema_decay": args.ema_decay, "seed": args.seed,
                                            "accumulate": args.accumulate, "precision": args.precision},
                                           sort_keys=True),
                    "final_loss": f"{sum(tail) / len(tail):.5f}"}
        if args.half:
            model = copy.deepcopy(model).half()
        model.save(args.out, metadata, base=weights_path(args) if args.unet_only else None)
        print(args.out)
    end_processes()
