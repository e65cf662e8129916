"""editlab make-pairs: InstructPix2Pix training pairs from caption pairs (the paper's recipe, docs/methods.md §6.2).

    editlab make-pairs --captions captions.jsonl --clip clip-vit-l-14.safetensors --out pairs
    editlab train-ip2p --data pairs --out ip2p.safetensors

--captions: one JSON object a line, {"input": caption, "edit": instruction, "output": edited caption} (the
paper's format). For each line, --samples before/after pairs are rendered (one shared noise, self-attention
injected for a random p ~ U(--p-range) of the steps, guidance ~ U(--guidance-range)), scored with CLIP and
at most --keep are kept (editing/instruct_pix2pix/pairs.py). --clip is a local open_clip state dict (ViT-L/14 with
QuickGELU unless --clip-config gives another JSON open_clip config).

--toy-captions N instead draws N toy-world caption pairs (editing/instruct_pix2pix/toy_pairs.py), and
--filter toy replaces CLIP by the toy world's attribute readers, e.g. the training data of the bundled toy
InstructPix2Pix model:

    editlab make-pairs --toy-captions 1500 --filter toy --samples 2 --keep 1 --steps 20 --scheduler ddim --out DIR

Writes into --out DIR: pairs.jsonl (the PairFolder list train-ip2p reads: before, after, instruction, plus the
captions, the sample's draws and filter scores), samples.jsonl (every sample, kept or not, with its scores:
CLIP similarities, or the toy reads) and NNNNNNN/SEED_0.png, SEED_1.png (before, after; each PNG records its
parameters); with --format webdataset the images go into pairs-NNNNNN.tar shards instead (KEY.before.png,
KEY.after.png, KEY.txt, KEY.json) and pairs.jsonl names each pair's shard and key.

Several processes: ``torchrun --nproc_per_node 8 -m editing.cli make-pairs ...`` (any number of processes and
nodes) split the shards by index and make exactly the pairs one process makes; Ctrl-C, SIGKILL or a lost node
leave a folder that ``--resume`` continues without rendering a recorded caption pair again
(editing/instruct_pix2pix/pair_runs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from ldm.clip_models import load_clip
from ldm.files import atomic_path
from ldm.images import file_sha256, save_png
from ldm.interrupt import Interrupted, StopFlag, check_options
from ldm.training import backend_for, start_processes

from ..options import (TOY_CLIP_WEIGHTS, add_model_arguments, add_sampler_arguments, check_sampler, load_model,
                       native_size, run_settings, sampler_options, toy_default, weights_path, weights_sha256)
from ..instruct_pix2pix.pair_runs import PairRun

NAME = "make-pairs"
HELP = "InstructPix2Pix training data: render caption pairs with Prompt-to-Prompt and keep CLIP-filtered ones"
KEYS = ("input", "edit", "output")


def add_arguments(parser):
    add_model_arguments(parser, "a text-to-image model (4-channel UNet)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", type=Path,
                        help='JSONL, one {"input": caption, "edit": instruction, "output": edited caption} a line')
    source.add_argument("--toy-captions", type=int, metavar="N",
                        help="N random toy-world caption pairs (colour, shape or background edits; seeded by --seed)")
    parser.add_argument("--filter", choices=("clip", "toy"), default="clip",
                        help="clip: the paper's CLIP filters (--clip; the toy CLIP with the toy model); toy: the toy "
                             "world's attribute readers")
    parser.add_argument("--clip", type=Path, default=None,
                        help="open_clip CLIP weights (.safetensors/.pt); default with the toy model: the bundled toy CLIP")
    parser.add_argument("--clip-config", type=Path, default=None,
                        help="JSON open_clip model config (embed_dim, vision_cfg, text_cfg); default ViT-L/14")
    parser.add_argument("--samples", type=int, default=100, help="samples rendered per caption pair (paper: 100)")
    parser.add_argument("--keep", type=int, default=4, help="at most this many kept per caption pair (paper: 4)")
    parser.add_argument("--steps", type=int, default=100)
    add_sampler_arguments(parser, "euler-a")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (p, guidance, noise)")
    parser.add_argument("--height", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--p-range", type=float, nargs=2, default=(0.1, 0.9), metavar=("LOW", "HIGH"),
                        help="fraction of the steps with injected self-attention, p ~ U(LOW, HIGH)")
    parser.add_argument("--guidance-range", type=float, nargs=2, default=(7.5, 15.0), metavar=("LOW", "HIGH"),
                        help="classifier-free guidance scale ~ U(LOW, HIGH)")
    parser.add_argument("--min-image-text", type=float, default=0.2, help="CLIP image-caption similarity threshold")
    parser.add_argument("--min-image-image", type=float, default=0.75,
                        help="CLIP before-after image similarity threshold (paper 0.75; the public script 0.7)")
    parser.add_argument("--min-direction", type=float, default=0.2, help="CLIP directional similarity threshold")
    parser.add_argument("--min-iou", type=float, default=0.7,
                        help="--filter toy: before-after object mask IoU threshold for colour/background edits")
    parser.add_argument("--batch", type=int, default=16, help="(caption pair, sample) items per sampling loop")
    parser.set_defaults(images_per_loop=lambda args: 2 * args.batch)  # each item: its before and after image
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--format", choices=("folder", "webdataset"), default="folder",
                        help="folder: NNNNNNN/SEED_ROW.png files; webdataset: pairs-NNNNNN.tar shards (default folder)")
    parser.add_argument("--shard-size", type=int, default=100,
                        help="caption pairs per shard: the unit of work split across torchrun processes (default 100)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted or killed run in --out (recorded caption pairs are skipped)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the outputs of another run in --out, or start an unfinished run over")


def read_captions(path: Path) -> list[dict[str, str]]:
    """The caption pairs of a JSONL file; a line that is not an object with string input, edit and output
    is a one-line error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such captions file (JSONL, one object with {', '.join(KEYS)} a line)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg}); write one JSON object a line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object; write one object with {', '.join(KEYS)} a line")
        missing = [key for key in KEYS if not isinstance(row.get(key), str) or not row[key].strip()]
        if missing:
            raise ValueError(f"{path}:{number}: missing or empty {', '.join(repr(k) for k in missing)}; each line "
                             "needs the input caption, the edit instruction and the output caption")
        rows.append({key: row[key] for key in KEYS})
    if not rows:
        raise ValueError(f"{path}: lists no caption pairs")
    return rows


def caption_pairs(args) -> list[dict[str, str]]:
    from ..instruct_pix2pix.toy_pairs import check_toy_caption, toy_caption_pairs

    if args.toy_captions is not None and args.toy_captions < 1:
        raise ValueError(f"--toy-captions {args.toy_captions}: ask for at least 1 caption pair")
    captions = read_captions(args.captions) if args.captions else toy_caption_pairs(args.toy_captions, args.seed)
    if args.filter == "toy":
        for caption in captions:  # fail before rendering anything
            check_toy_caption(caption["input"]), check_toy_caption(caption["output"])
    return captions


def sample_filter(args, recipe, device):
    """(filter, run-info entries) for --filter."""
    from ..instruct_pix2pix.pairs import ClipFilter
    from ..instruct_pix2pix.toy_pairs import ToyFilter

    if args.filter == "toy":
        return ToyFilter(min_iou=args.min_iou, keep=args.keep), {"filter": "toy", "min_iou": args.min_iou}
    clip = load_clip(args.clip, args.clip_config, text_tower=True).to(device)
    return ClipFilter(clip, recipe), {"filter": "clip", "clip": args.clip.name, "clip_sha256": file_sha256(args.clip)}


def run_options(args, captions: list[dict]) -> dict:
    """What changes the pairs made (recorded in OUT/.progress/run.json, checked on --resume)."""
    keys = ("filter", "samples", "keep", "steps", "scheduler", "seed", "height", "width", "p_range", "guidance_range",
            "min_image_text", "min_image_image", "min_direction", "min_iou", "batch", "shard_size", "format", "dtype")
    options = {f"--{k.replace('_', '-')}": list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
               if k in keys}
    options["captions (sha256)"] = hashlib.sha256(json.dumps(captions).encode()).hexdigest()
    options["weights (sha256)"] = file_sha256(weights_path(args))
    if args.filter == "clip":
        options["clip (sha256)"] = file_sha256(args.clip)
    return options


def check_start(args, run_dir: Path, options: dict) -> None:
    """--resume continues the run in --out with the same options; without it an unfinished run, or another
    run's finished lists, are not overwritten unless --force (which clears the unfinished run)."""
    recorded = run_dir / "run.json"
    if args.resume:
        if not recorded.is_file():
            raise FileNotFoundError(f"{args.out}: no make-pairs run to resume ({recorded} missing); start without "
                                    "--resume")
        check_options(json.loads(recorded.read_text()), options)
        return
    for path in (args.out / "pairs.jsonl", args.out / "samples.jsonl"):
        if path.exists() and not args.force:
            raise FileExistsError(f"{path} exists; choose another --out or pass --force")
    if run_dir.exists() and not args.force:
        raise FileExistsError(f"{args.out} holds an unfinished make-pairs run; rerun with --resume to continue it, "
                              "or --force to start over")


def run(args):
    from ..instruct_pix2pix.pairs import PairRecipe, make_caption_pairs  # imported here: the CLI lists every command

    if args.filter == "clip":
        if args.clip_config is not None and args.clip is None:
            raise ValueError("--clip-config describes a --clip file; pass --clip too (or neither for the toy CLIP)")
        args.clip = toy_default(args, args.clip, TOY_CLIP_WEIGHTS, "--clip")
    if args.filter == "clip" and not args.clip.is_file():
        raise FileNotFoundError(f"{args.clip}: no such CLIP weights file (a local open_clip state dict)")
    if args.batch < 1 or args.shard_size < 1:
        raise ValueError(f"--batch {args.batch} and --shard-size {args.shard_size}: give at least 1 each")
    captions = caption_pairs(args)
    layout = PairRun(args.out, len(captions), args.batch, args.samples, args.shard_size, args.format)
    options = run_options(args, captions)
    check_start(args, layout.progress, options)
    rank, processes = start_processes(backend_for(args.device))  # under torchrun each renders its own shards
    if rank == 0 and layout.progress.exists() and not args.resume:
        shutil.rmtree(layout.progress)  # --force: the unfinished run starts over
    if processes > 1:
        dist.barrier()
    recipe = PairRecipe(samples=args.samples, keep=args.keep, p_range=tuple(args.p_range),
                        guidance_range=tuple(args.guidance_range), steps=args.steps, negative=args.negative,
                        **sampler_options(args), seed=args.seed, min_image_text=args.min_image_text, min_image_image=args.min_image_image,
                        min_direction=args.min_direction)
    model = load_model(args)
    if model.config.unet.in_channels != model.config.vae.latent_channels:
        raise ValueError(f"{weights_path(args)}: a {model.config.unet.in_channels}-channel UNet; make-pairs renders "
                         "with a text-to-image model (SD 1.x/2.x or the bundled toy model), not an InstructPix2Pix one")
    side = native_size(model)
    recipe = dataclasses.replace(recipe, height=args.height or side, width=args.width or side)
    check_sampler(model, recipe.sampling(recipe.seed, recipe.guidance_range[0]))
    chosen, filter_info = sample_filter(args, recipe, model.device)
    run_info = {"command": NAME, "weights": weights_path(args).name, "weights_sha256": weights_sha256(weights_path(args)), **run_settings(args),
                **filter_info, "scheduler": recipe.scheduler, "spacing": recipe.spacing, "karras": recipe.karras,
                "rescale_zero_snr": recipe.rescale_zero_snr, "guidance_rescale": recipe.guidance_rescale,
                "negative": recipe.negative or "", "steps": recipe.steps, "height": recipe.height,
                "width": recipe.width, "recipe_seed": recipe.seed, "dtype": args.dtype}
    layout.progress.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.progress / "run.json") as tmp:  # the same content from every process
        tmp.write_text(json.dumps(options, sort_keys=True))
    pair_list = [(c["input"], c["output"]) for c in captions]
    with StopFlag() as stop:
        for shard in layout.my_shards(rank, processes):
            entries = layout.recorded(shard)
            for unit in layout.shard_units(shard):
                if unit in entries:
                    continue  # recorded: never rendered again
                indices = list(layout.unit_captions(unit))
                entry = {"unit": unit, "samples": [], "pairs": []}
                for index, results in make_caption_pairs(model, [pair_list[i] for i in indices], recipe, chosen,
                                                         batch=args.batch, indices=indices):
                    kept = write_caption_pair(layout, shard, index, captions[index], results, run_info, entry, args)
                    print(f"caption pair {index}: kept {kept} of {len(results)} samples "
                          f"({captions[index]['input']!r} -> {captions[index]['output']!r})")
                layout.record(shard, entry)
                entries[unit] = entry
                if stop.requested:
                    raise Interrupted(f"caption pair {indices[-1]}", layout.journal(shard))
            layout.finish_shard(shard, entries)
    written = layout.write_index()
    if written is None:
        print(f"rank {rank}: my shards are done; the lists are written by the last process to finish")
        return 0
    pairs, _ = written
    print(f"{args.out / 'pairs.jsonl'}: {len(pairs)} pairs from {len(captions)} caption pairs")
    if not pairs:
        print(f"editlab {NAME}: no sample passed {chosen.describe()}; see the scores in {args.out / 'samples.jsonl'}",
              file=sys.stderr)
        return 1


def write_caption_pair(layout: PairRun, shard: int, index: int, caption: dict, results, run_info: dict,
                       entry: dict, args) -> int:
    """Write one caption pair's kept images and add its rows to the unit's journal entry; returns kept count."""
    kept = 0
    for sample in results:
        info = {"caption_index": index, **caption, "seed": sample.draw.seed, "p": sample.draw.p,
                "guidance": sample.draw.guidance, **sample.scores, "rank": sample.rank}
        entry["samples"].append(info)
        if sample.rank is None:
            continue
        names = []
        for row in (0, 1):
            path, name = layout.image_path(shard, index, sample.draw.seed, row)
            save_png(path, sample.images[row], {**run_info, **info, "row": row}, force=args.force or args.resume)
            names.append(name)
        entry["pairs"].append({"before": names[0], "after": names[1], "instruction": caption["edit"], **info})
        kept += 1
    entry["pairs"].sort(key=lambda row: (row["caption_index"], row["rank"]))
    return kept
