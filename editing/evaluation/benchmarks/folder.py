"""MagicBrush-style cases from a folder: (source, instruction, ground-truth target) pairs.

``ROOT/pairs.jsonl`` lists one case a line, paths relative to ROOT (the layout InstructPix2Pix training
reads, with optional extras):

    {"before": "src/1.png", "after": "gt/1.png", "instruction": "put a hat on the dog",
     "id": "1", "source_prompt": "a dog", "target_prompt": "a dog in a hat", "mask": "mask/1.png"}

``id`` defaults to the line number; the prompts default to "" (then text-prompted methods cannot run the
case and say so); a mask PNG marks the edited region with non-zero pixels. The target is resized to the
source's size when they differ (MagicBrush's own evaluation resizes the output to the ground truth's size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.images import load_image

from ..cases import EditCase


def load_folder(root: Path) -> list[EditCase]:
    root = Path(root)
    index = root / "pairs.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no case list; write one JSON object a line with keys before, after, "
                                "instruction (and optionally id, source_prompt, target_prompt, mask)")
    cases = []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            before, after, instruction = row["before"], row["after"], str(row["instruction"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index}:{number}: not a JSON object with before, after and instruction") from None
        image = load_image(root / before)[0]
        height, width = image.shape[-2:]
        target = load_image(root / after, (width, height))[0]
        mask = None
        if row.get("mask"):
            path = root / row["mask"]
            if not path.is_file():
                raise FileNotFoundError(f"{index}:{number}: mask {path} not found")
            picture = Image.open(path).convert("L").resize((width, height), Image.NEAREST)
            mask = torch.from_numpy(np.asarray(picture) > 0)
        cases.append(EditCase(id=str(row.get("id", number)), image=image, source_prompt=row.get("source_prompt", ""),
                              target_prompt=row.get("target_prompt", ""), instruction=instruction, mask=mask,
                              target=target, kind=str(row.get("kind", ""))))
    if not cases:
        raise ValueError(f"{index}: lists no cases")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{index}: case ids repeat; give each line a distinct id")
    return cases
