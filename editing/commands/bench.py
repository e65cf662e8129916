"""editlab bench: speed (and GPU memory) of editlab beside diffusers, same config, measured in one run."""

from __future__ import annotations

import importlib

import torch

from ldm.schedulers import SAMPLERS
from ldm.config import PRESETS

from ..options import DTYPES

NAME = "bench"
HELP = ("benchmark editlab against diffusers side by side (unet: one UNet forward; sample: text to image); "
        "p2p: a 2-prompt Prompt-to-Prompt edit against the plain generation of the same two images; gpu: the "
        "whole GPU table (UNet, generation, P2P, ControlNet, DDPM inversion) as Markdown; stream: peak memory of "
        "streaming 100 vs 2000 packed 512 px pairs; checkpointing: UNet training memory with and without "
        "gradient checkpointing; weights: peak memory of convert and load of a full-size random checkpoint "
        "(SDXL presets); quality: the toy model's caption accuracy per sampler")
TARGETS = ("unet", "sample", "p2p", "gpu", "stream", "checkpointing", "weights", "quality")


def add_arguments(parser):
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model config (default: sd15 for unet; toy on CPU / "
                                                       "sd15 on GPU for sample and p2p)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the benchmark runs: cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, fp16 on GPU")
    parser.add_argument("--batch", type=int, default=2, help="unet: batch (2 = one guided step)")
    parser.add_argument("--size", type=int, default=None, help="unet: latent side (64); sample: image side")
    parser.add_argument("--steps", type=int, default=None,
                        help="sample, p2p: steps (50 on GPU; on CPU 20, or 5 for p2p at an SD preset: every phase "
                             "of the edit, at the defaults' fractions exactly)")
    parser.add_argument("--scheduler", default="ddim", metavar="NAME",
                        help=f"sample: any editlab sampler ({', '.join(SAMPLERS)}) or AUTOMATIC1111 name, run "
                             "beside the diffusers scheduler of the same name (default: ddim)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu-memory", action="store_true",
                        help="p2p on CPU: also measure each run's peak resident memory in a fresh process")
    parser.add_argument("--nchw", action="store_true", help="unet: run editlab in plain NCHW layout instead of "
                                                            "its default channels_last")
    parser.add_argument("--separate", action="store_true",
                        help="unet on CPU: one model at a time, each with its own copy of the weights (diffusers' "
                             "saved folder, converted by editlab), in a fresh process per round (--repeats rounds, "
                             "order alternating), with load time and peak resident memory; for models whose two "
                             "copies do not fit together (SDXL: 10.3 GB each in fp32)")
    parser.add_argument("--forwards", type=int, default=2, help="unet --separate: timed forwards per process")
    parser.add_argument("--work", default=None, help="weights, unet --separate: folder for the temporary checkpoint files")
    parser.add_argument("--dry-run", action="store_true",
                        help="gpu: every row at a tiny config, 2 steps, once (checks the script; numbers mean nothing)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="gpu: leave out the CUDA-graph row")


def run(args):
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    if args.target in ("stream", "checkpointing"):  # CPU memory at scale (editing/bench/scale.py)
        from ..bench import scale

        print(scale.run_stream() if args.target == "stream" else
              scale.run_checkpointing(args.preset or "toy", args.size or 64, args.batch if args.batch != 2 else 8))
        return
    bench = importlib.import_module(f"editing.bench.{args.target}")
    if args.target == "quality":
        from ..options import TOY_WEIGHTS

        print(bench.run(TOY_WEIGHTS))
        return
    if args.target == "weights":
        text = bench.run(args.preset or "sdxl-base", DTYPES[args.dtype or "fp16"], args.work)
    elif args.target == "gpu":
        if not gpu and not args.dry_run:
            raise ValueError(f"bench gpu measures a CUDA device (got {device}); add --dry-run to check it on the CPU")
        if args.dry_run:
            text = bench.run(args.preset or "tiny-sd1", args.size or 16, args.steps or 2, dtype, device, 1, 0,
                             not args.no_cuda_graph)
        else:
            text = bench.run(args.preset or "sd15", args.size or 512, args.steps or 50, dtype, device,
                             args.repeats, args.warmup, not args.no_cuda_graph)
    elif args.target == "unet" and args.separate:
        if gpu:
            raise ValueError("bench unet --separate measures the CPU (resident memory); drop --separate on a GPU")
        from ..bench import unet_separate

        text = unet_separate.run(args.preset or "sd15", args.batch, args.size or 64, dtype, args.repeats,
                                 args.warmup, args.forwards, args.work)
    elif args.target == "unet":
        text = bench.run(args.preset or "sd15", args.batch, args.size or 64, dtype, device, args.repeats,
                         args.warmup, not args.nchw)
    else:
        preset = args.preset or ("sd15" if gpu else "toy")
        size = args.size or (512 if preset.startswith("sd") else 64)
        steps = args.steps or (50 if gpu else 5 if args.target == "p2p" and preset.startswith("sd") else 20)
        extra = {"cpu_memory": args.cpu_memory} if args.target == "p2p" else {"scheduler": args.scheduler}
        text = bench.run(preset, size, steps, dtype, device, args.repeats, args.warmup, **extra)
    print(text)
