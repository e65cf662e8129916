"""PIE-Bench (*PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code*, Ju et al., ICLR 2024):
its on-disk format, read as its own evaluation code reads it.

``ROOT/mapping_file.json`` is a dict keyed by a 12-digit id; each value has

    image_path           relative to ROOT/annotation_images/ (512×512 images)
    original_prompt      the source prompt; "[" and "]" are dropped
    editing_prompt       the target prompt, the changed words in brackets ("a [rusty] bike"); brackets dropped
    editing_instruction  the same edit as an instruction (for InstructPix2Pix)
    editing_type_id      a string "0" … "9"
    blended_word         "source_word target_word", or ""
    mask                 the edit mask, run-length encoded (decode_mask)

The mask code is not COCO's alternating RLE: it is a flat list of pairs (start, length), ``start`` an absolute
index into the row-major 512·512 array and each run a run of ones, clipped at the array's end; after decoding,
the first and last rows and columns are set to 1 (the benchmark treats the image border as edited "to avoid
annotation errors in boundary"), so the border never counts as unedited background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ldm.images import load_image

from ..cases import EditCase

PIE_SIZE = (512, 512)
FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
          "blended_word", "mask")


def decode_mask(runs, shape: tuple[int, int] = PIE_SIZE) -> np.ndarray:
    """PIE-Bench's run-length mask -> bool [H, W], border forced to True."""
    if len(runs) % 2:
        raise ValueError(f"a PIE-Bench mask is a list of (start, length) pairs; got an odd length {len(runs)}")
    total = shape[0] * shape[1]
    flat = np.zeros(total, dtype=bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"PIE-Bench mask run ({start}, {length}) is negative")
        flat[start:min(start + length, total)] = True  # clipped at the array's end
    mask = flat.reshape(shape)  # row-major (C order)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """The inverse of ``decode_mask`` up to the border: runs of True as (start, length) pairs."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).reshape(-1), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # starts and ends of runs, alternating
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def strip_brackets(text: str) -> str:
    return text.replace("[", "").replace("]", "")


def load_pie_bench(root: Path, categories: tuple[str, ...] | None = None) -> list[EditCase]:
    """Cases from ``root`` (the folder holding mapping_file.json and annotation_images/), in the file's order;
    ``categories`` keeps only those editing_type_id strings."""
    root = Path(root)
    index = root / "mapping_file.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; --root must be PIE-Bench's data folder (the one holding "
                                "mapping_file.json and annotation_images/)")
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index}: not valid JSON ({err}); re-download PIE-Bench") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{index}: expected a JSON object keyed by image id, got {type(entries).__name__}")
    cases = []
    for key, entry in entries.items():
        missing = [f for f in FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise ValueError(f"{index}: entry {key} lacks {', '.join(missing)}; is this PIE-Bench's mapping file?")
        kind = str(entry["editing_type_id"])
        if categories is not None and kind not in categories:
            continue
        image = load_image(root / "annotation_images" / entry["image_path"])[0]
        mask = decode_mask(entry["mask"])
        if tuple(image.shape[-2:]) != mask.shape:
            raise ValueError(f"{index}: entry {key}: image {entry['image_path']} is {tuple(image.shape[-2:])}, "
                             f"its mask {mask.shape}; PIE-Bench images are 512×512")
        words = tuple(entry["blended_word"].split()) if entry["blended_word"] else ("", "")
        if len(words) != 2:
            raise ValueError(f"{index}: entry {key}: blended_word {entry['blended_word']!r} is not 'source target'")
        cases.append(EditCase(id=str(key), image=image, source_prompt=strip_brackets(entry["original_prompt"]),
                              target_prompt=strip_brackets(entry["editing_prompt"]),
                              instruction=entry["editing_instruction"], words=words, mask=torch.from_numpy(mask),
                              kind=kind))
    if not cases:
        raise ValueError(f"{index}: no cases" + (f" of editing types {list(categories)}" if categories else ""))
    return cases
