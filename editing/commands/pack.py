"""editlab pack: turn a data folder into WebDataset tar shards that the training commands stream.

    editlab pack --data fill50k/ --out fill50k-shards/ --shard-size 1000
    editlab train-controlnet --data fill50k-shards/ ...

--data is a ControlNet folder (prompts.jsonl or metadata.jsonl: {"target", "prompt", "source"} lines) or an
InstructPix2Pix folder (pairs.jsonl: {"before", "after", "instruction"} lines), paths relative to it. Each line
becomes one sample, key NNNNNNNNN (its line order):

    ControlNet:      KEY.png (or .jpg/.jpeg/.webp: the target's bytes, unchanged), KEY.hint.png (if "source"), KEY.txt
    InstructPix2Pix: KEY.before.png, KEY.after.png, KEY.txt (the instruction)

Image bytes are copied, not decoded, so packing is fast and lossless; PNG inputs are required for the pair
parts and hints. Shards (OUT/data-NNNNNN.tar) are written one at a time, atomically, holding --shard-size
samples each; only one shard's samples are in memory at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm.shards import list_shards, shard_name, write_shard

NAME = "pack"
HELP = "pack a data folder (images, hints, prompts.jsonl or pairs.jsonl) into WebDataset tar shards"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_arguments(parser):
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with prompts.jsonl / metadata.jsonl (ControlNet) or pairs.jsonl (InstructPix2Pix)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--force", action="store_true", help="replace shards already in --out")


def _lines(manifest: Path):
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{manifest} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{manifest} line {number}: not a JSON object")
            yield number, entry


def _file(folder: Path, name, where: str, what: str, suffixes=IMAGE_SUFFIXES) -> tuple[str, bytes]:
    if not isinstance(name, str):
        raise ValueError(f"{where}: no {what} path")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {what} file {path} not found")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{where}: {path.name} is not a {'/'.join(suffixes)} file")
    return path.suffix.lower().lstrip("."), path.read_bytes()


def samples(folder: Path):
    """(key, parts) for every line of the folder's manifest, read one at a time."""
    pairs = folder / "pairs.jsonl"
    manifest = pairs if pairs.is_file() else next(
        (folder / n for n in ("prompts.jsonl", "metadata.jsonl") if (folder / n).is_file()), None)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no pairs.jsonl, prompts.jsonl or metadata.jsonl to pack")
    for number, entry in _lines(manifest):
        where, key = f"{manifest} line {number}", f"{number - 1:09d}"
        if manifest == pairs:
            if not isinstance(entry.get("instruction"), str):
                raise ValueError(f'{where}: need "before", "after" and a string "instruction"')
            parts = {f"{row}.png": _file(folder, entry.get(row), where, row, (".png",))[1]
                     for row in ("before", "after")}
            parts["txt"] = entry["instruction"].encode()
        else:
            if not isinstance(entry.get("prompt"), str):
                raise ValueError(f'{where}: need a string "target" and "prompt"')
            suffix, target = _file(folder, entry.get("target"), where, "target")
            parts = {suffix: target, "txt": entry["prompt"].encode()}
            if entry.get("source") is not None:
                parts["hint.png"] = _file(folder, entry["source"], where, "hint", (".png",))[1]
        yield key, parts


def run(args):
    if args.shard_size < 1:
        raise ValueError(f"--shard-size {args.shard_size}: give at least 1")
    if not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if list_shards(args.out) and not args.force:
        raise FileExistsError(f"{args.out} already holds .tar shards; choose another --out or pass --force")
    for old in list_shards(args.out):
        old.unlink()
    stream, shard, total = samples(args.data), 0, 0
    while True:
        chunk = [item for _, item in zip(range(args.shard_size), stream)]
        if not chunk:
            break
        write_shard(args.out / shard_name("data", shard), chunk)
        shard, total = shard + 1, total + len(chunk)
    if total == 0:
        raise ValueError(f"{args.data}: the manifest lists no samples")
    print(f"{args.out}: {total} samples in {shard} shards")
