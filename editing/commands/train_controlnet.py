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

import dataclasses
import json
from pathlib import Path

import torch

from controls.controlnet import SD_HINT_CHANNELS, ControlNet
from controls.train import ControlTrainConfig, ToyCannyTriples, manifest_path, recipe, train_controlnet, triple_source
from ldm.files import file_sha256
from ldm.shards import list_shards
from ldm.training import backend_for, end_processes, start_processes

from ..options import add_model_arguments, check_training_output, load_model, native_size, weights_path
from ..training_cli import add_scale_arguments, check_scale_arguments, data_fingerprint, recorded_options, start_checks

NAME = "train-controlnet"
HELP = "train a ControlNet (toy shapes or a folder of image/hint/prompt triples) against a locked SD model"
RECIPE = "editlab-controlnet-v1"


def add_arguments(parser):
    add_model_arguments(parser, "the locked base model", prompts=False)
    parser.add_argument("--data", default="toy", metavar="toy|DIR",
                        help="toy shapes with Canny hints, a folder with prompts.jsonl (or metadata.jsonl) of "
                             '{"target", "prompt", "source"} lines, or a folder of WebDataset .tar shards '
                             "(KEY.png, KEY.hint.png, KEY.txt; editlab pack) (default: toy)")
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
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file, or start over an interrupted run's checkpoint")
    add_scale_arguments(parser)


def hint_channels(vae_factor: int) -> tuple[int, ...]:
    """The released widths, cut so the hint encoder downsamples by the VAE's factor (8: all four)."""
    n = vae_factor.bit_length()  # log2(f) + 1 entries: log2(f) stride-2 convs
    if vae_factor & (vae_factor - 1) or n > len(SD_HINT_CHANNELS):
        raise ValueError(f"no hint encoder for a VAE factor of {vae_factor}; supported: 1, 2, 4, 8")
    return SD_HINT_CHANNELS[:n]


def run(args):
    check_training_output(args)
    check_scale_arguments(args)
    checkpoint = args.checkpoint or args.out.with_suffix(".ckpt.pt")
    start_checks(checkpoint, args)
    shards = args.data != "toy" and bool(list_shards(args.data))
    manifest = None if args.data == "toy" or shards else manifest_path(args.data)  # fails before the model loads
    rank, processes = start_processes(backend_for(args.device))  # joins the group when launched by torchrun
    model = load_model(args)
    size = args.size or native_size(model)
    net = ControlNet.from_unet(model.unet, hint_channels(model.config.vae.downsample_factor),
                               torch.Generator().manual_seed(args.seed))
    detect = None if args.detect == "none" else args.detect
    if args.data == "toy":
        data, source = ToyCannyTriples(args.images, args.data_seed, size), {
            "data": "toy-canny", "images": str(args.images), "data_seed": str(args.data_seed)}
    else:
        data = triple_source(args.data, size, detect)
        source = {"data": str(Path(args.data).resolve()), "data_sha256": data_fingerprint(args.data),
                  "detect": args.detect, "images": str(len(data))}
        source.update({"data_manifest": manifest.name} if manifest else {"data_format": "webdataset"})
    train = recipe(args.lr, args.steps, args.seed, max(1, min(args.checkpoint_every, args.steps)))
    train = dataclasses.replace(train, accumulate=args.accumulate, precision=args.precision)
    cfg = ControlTrainConfig(args.batch, args.prompt_dropout, args.unlock_decoder)
    options = recorded_options(args, ["data", "detect", "size", "steps", "lr", "prompt_dropout", "unlock_decoder",
                                      "seed", "precision"], processes,
                               weights_sha256=file_sha256(weights_path(args)), size_used=size,
                               data_sha256=source.get("data_sha256", ""),
                               **({"--images": args.images, "--data-seed": args.data_seed}
                                  if args.data == "toy" else {}))
    net, losses = train_controlnet(model, net, data, train, cfg, checkpoint, resume=args.resume, workers=args.workers,
                                   gradient_checkpointing=args.gradient_checkpointing, options=options,
                                   force=args.force)
    if rank == 0:
        tail = losses[-50:]
        metadata = {"recipe": RECIPE, "base": weights_path(args).name, "base_sha256": file_sha256(weights_path(args)),
                    **source, "size": str(size), "steps": str(args.steps), "processes": str(processes),
                    "settings": json.dumps({"batch": args.batch, "lr": args.lr, "prompt_dropout": args.prompt_dropout,
                                            "unlock_decoder": args.unlock_decoder, "seed": args.seed,
                                            "accumulate": args.accumulate, "precision": args.precision},
                                           sort_keys=True),
                    "final_loss": f"{sum(tail) / len(tail):.5f}"}
        net.save(args.out, metadata)
        if args.unlock_decoder:
            model.save(args.out.with_name(args.out.stem + "-base.safetensors"), {"recipe": RECIPE})
        print(args.out)
    end_processes()
