"""editlab train-controlnet: train a ControlNet on toy shapes or your own images, Stable Diffusion locked.

    editlab train-controlnet --out toy-canny.safetensors                      (the toy model, 64² shapes)
    editlab train-controlnet --data fill50k/ --size 64 --out fill.safetensors (your own folder, see below)
    editlab train-controlnet --weights sd.safetensors --size 256 --steps 4000 --out canny.safetensors
    torchrun --nproc_per_node 2 -m editing.cli train-controlnet ... --out canny.safetensors    (DDP, gloo)

The recipe is tutorial_train.py's (AdamW, constant lr 1e-5, batch 4) plus the paper's 50% prompt dropout,
which the released code lacks. With --unlock-decoder the UNet decoder trains too, and the changed base model
is written next to the ControlNet (OUT with "-base" added). Under torchrun --batch is per process; the run
equals one process with batch × processes. --resume continues exactly from the checkpoint.

--data toy (default) draws --images N toy shapes with their Canny edges. --data DIR reads DIR/prompts.jsonl
(or metadata.jsonl), one JSON object a line, paths relative to DIR (the Fill50K tutorial's layout):

    {"target": "images/0.png", "prompt": "a red circle", "source": "hints/0.png"}

Every image is resized to --size² (Lanczos). Lines without "source" get the Canny edges of the target
(--detect canny, the default); with --detect none every line needs a hint. The output records the folder
and the manifest's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from controls.controlnet import SD_HINT_CHANNELS, ControlNet
from controls.train import (ControlTrainConfig, encode_triples, folder_triples, manifest_path, recipe,
                            toy_canny_triples, train_controlnet)
from ldm.files import file_sha256
from ldm.training import end_processes, start_processes

from ..options import add_model_arguments, check_training_output, load_model, native_size, weights_path

NAME = "train-controlnet"
HELP = "train a ControlNet (toy shapes or a folder of image/hint/prompt triples) against a locked SD model"
RECIPE = "editlab-controlnet-v1"


def add_arguments(parser):
    add_model_arguments(parser, "the locked base model", prompts=False)
    parser.add_argument("--data", default="toy", metavar="toy|DIR",
                        help="toy shapes with Canny hints, or a folder with prompts.jsonl (or metadata.jsonl) of "
                             '{"target", "prompt", "source"} lines (default: toy)')
    parser.add_argument("--detect", choices=("canny", "none"), default="canny",
                        help='hints for folder lines without "source": Canny edges of the target, or none (error)')
    parser.add_argument("--images", type=int, default=2000, help="number of toy images (with --data toy)")
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4, help="samples per process and step")
    parser.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate (release: 1e-5)")
    parser.add_argument("--prompt-dropout", type=float, default=0.5,
                        help='share of prompts replaced by "" (paper: 0.5)')
    parser.add_argument("--unlock-decoder", action="store_true", help="also train the UNet decoder (sd_locked=False)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the hint encoder's init and every step's draws")
    parser.add_argument("--checkpoint", type=Path, default=None, help="resumable checkpoint (default: OUT.ckpt.pt)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="output editlab ControlNet file (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def hint_channels(vae_factor: int) -> tuple[int, ...]:
    """The released widths, cut so the hint encoder downsamples by the VAE's factor (8: all four)."""
    n = vae_factor.bit_length()  # log2(f) + 1 entries: log2(f) stride-2 convs
    if vae_factor & (vae_factor - 1) or n > len(SD_HINT_CHANNELS):
        raise ValueError(f"no hint encoder for a VAE factor of {vae_factor}; supported: 1, 2, 4, 8")
    return SD_HINT_CHANNELS[:n]


def run(args):
    check_training_output(args)
    rank, processes = start_processes("gloo")  # joins the group when launched by torchrun
    manifest = None if args.data == "toy" else manifest_path(args.data)  # fails before the model loads
    model = load_model(args)
    size = args.size or native_size(model)
    net = ControlNet.from_unet(model.unet, hint_channels(model.config.vae.downsample_factor),
                               torch.Generator().manual_seed(args.seed))
    if manifest is None:
        triples, source = toy_canny_triples(args.images, args.data_seed, size), {
            "data": "toy-canny", "images": str(args.images), "data_seed": str(args.data_seed)}
    else:
        triples = folder_triples(args.data, size, None if args.detect == "none" else args.detect)
        source = {"data": str(Path(args.data).resolve()), "data_manifest": manifest.name,
                  "data_sha256": file_sha256(manifest), "detect": args.detect, "images": str(len(triples[2]))}
    data = encode_triples(model, *triples)
    train = recipe(args.lr, args.steps, args.seed, max(1, min(args.checkpoint_every, args.steps)))
    cfg = ControlTrainConfig(args.batch, args.prompt_dropout, args.unlock_decoder)
    checkpoint = args.checkpoint or args.out.with_suffix(".ckpt.pt")
    net, losses = train_controlnet(model, net, data, train, cfg, checkpoint, resume=args.resume)
    if rank == 0:
        tail = losses[-50:]
        metadata = {"recipe": RECIPE, "base": weights_path(args).name, "base_sha256": file_sha256(weights_path(args)),
                    **source, "size": str(size), "steps": str(args.steps), "processes": str(processes),
                    "settings": json.dumps({"batch": args.batch, "lr": args.lr, "prompt_dropout": args.prompt_dropout,
                                            "unlock_decoder": args.unlock_decoder, "seed": args.seed}, sort_keys=True),
                    "final_loss": f"{sum(tail) / len(tail):.5f}"}
        net.save(args.out, metadata)
        if args.unlock_decoder:
            model.save(args.out.with_name(args.out.stem + "-base.safetensors"), {"recipe": RECIPE})
        print(args.out)
    end_processes()
