"""Command-line pieces shared by the training commands: the scale options, and what a checkpoint records.

Every long command records in its checkpoint the options that change its result (``recorded_options``):
the data (and a fingerprint of its files), the sizes, the batch, the seeds, the input images' hashes. A run
resumed with another value is refused with the option's name (ldm/interrupt.py). The batch is recorded as the
global batch (--batch × processes × --accumulate), so a run can resume on another number of processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ldm.files import file_sha256, remove_stale_temporaries
from ldm.interrupt import check_fresh_start
from ldm.shards import list_shards
from ldm.training import PRECISIONS


def add_scale_arguments(parser, batch_help: str = "samples per process and step") -> None:
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per optimiser step (gradient accumulation; default 1)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp32, bf16 autocast, or fp16 autocast with a gradient scaler (default fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute block activations in the backward pass (less memory, about one more forward)")
    parser.add_argument("--workers", type=int, default=0,
                        help="dataloader processes reading and decoding the data ahead (default 0: in-process)")


def check_scale_arguments(args) -> None:
    if args.accumulate < 1:
        raise ValueError(f"--accumulate {args.accumulate}: give at least 1")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 or more")
    if args.precision == "fp16" and args.device == "cpu":
        raise ValueError("--precision fp16 needs a GPU (--device cuda); use bf16 or fp32 on the CPU")


def data_fingerprint(data: str | Path) -> str:
    """SHA-256 naming a data folder's content cheaply: its manifest's bytes, or its shards' names and sizes."""
    data = Path(data)
    shards = list_shards(data)
    if shards:
        digest = hashlib.sha256()
        for path in shards:
            digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        return digest.hexdigest()
    for name in ("pairs.jsonl", "prompts.jsonl", "metadata.jsonl"):
        if (data / name).is_file():
            return file_sha256(data / name)
    return ""


def recorded_options(args, names: list[str], processes: int, **extra) -> dict:
    """{"--option": value} for ``names`` (argparse dests), the global batch, and ``extra`` entries."""
    options = {f"--{name.replace('_', '-')}": _plain(getattr(args, name)) for name in names}
    if hasattr(args, "batch"):
        options["global batch (--batch × processes × --accumulate)"] = (
            args.batch * processes * getattr(args, "accumulate", 1))
    return {**options, **{k: _plain(v) for k, v in extra.items()}}


def _plain(value):
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def start_checks(checkpoint: Path, args) -> None:
    """Before any work: refuse to start over an unfinished run (unless --force), clear stale temporaries."""
    check_fresh_start(checkpoint, args.resume, getattr(args, "force", False))
    remove_stale_temporaries(checkpoint)
    remove_stale_temporaries(args.out)
