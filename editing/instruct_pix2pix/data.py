"""Paired training data for InstructPix2Pix: (input image, instruction, edited image) triples.

Paper recipe (*InstructPix2Pix*, §3.1; docs/methods.md §6.2), for real images: a fine-tuned GPT-3 writes an
instruction and an edited caption for each LAION caption; SD 1.5 renders both captions with the same noise,
100 Euler-ancestral steps, Prompt-to-Prompt replacing **self**-attention only for the first p ~ U(0.1, 0.9)
of the steps and cfg ~ U(7.5, 15); of 100 samples per caption pair at most 4 survive CLIP ViT-L/14 filters
(image-image ≥ 0.75, direction ≥ 0.2, image-text ≥ 0.2). That recipe needs the language model, CLIP and
Prompt-to-Prompt; editlab reads its output, or any pairs, from a folder (``PairFolder``).

Toy recipe (``ToyEditPairs``), exact pairs without a generator: one toy-world spec is rendered twice, before
and after one edit, with the same geometry and background texture:

| edit       | change                                   | instruction                       |
|------------|------------------------------------------|-----------------------------------|
| colour     | object colour -> another (≠ background)  | "make the circle green"           |
| shape      | shape -> another                         | "turn the circle into a square"   |
| background | background -> another (≠ object colour)  | "make the background yellow"      |

Shards (``PairShards``): WebDataset tar shards (ldm/shards.py) of samples KEY.before.png, KEY.after.png,
KEY.txt (the instruction), as ``editlab make-pairs --format webdataset`` and ``editlab pack`` write them.

Items are dicts {before, after: float [3, H, W] in [0, 1], instruction: str}. All three are map-style and
read one pair at a time, so training streams them (ldm/stream.py) without holding the data in memory.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch
from PIL import Image

from ldm.seeding import derived_seed
from ldm.shards import index_shards, list_shards
from ldm.stream import CorruptSample, decode_sample
from ldm.toy.shapes import COLOURS, SHAPES, ShapeSpec, render, sample_spec

from .sizing import fit, open_rgb, to_tensor

EDIT_KINDS = ("colour", "shape", "background")


def _pick(options: list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def sample_edit(spec: ShapeSpec, generator: torch.Generator) -> tuple[ShapeSpec, str]:
    """One random edit of ``spec``: (edited spec, instruction). Uses exactly 2 uniform draws."""
    kind_draw, value_draw = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    kind = _pick(list(EDIT_KINDS), kind_draw)
    if kind == "colour":
        colour = _pick([c for c in COLOURS if c not in (spec.colour, spec.background)], value_draw)
        return dataclasses.replace(spec, colour=colour), f"make the {spec.shape} {colour}"
    if kind == "shape":
        shape = _pick([s for s in SHAPES if s != spec.shape], value_draw)
        return dataclasses.replace(spec, shape=shape), f"turn the {spec.shape} into a {shape}"
    background = _pick([c for c in COLOURS if c not in (spec.colour, spec.background)], value_draw)
    return dataclasses.replace(spec, background=background), f"make the background {background}"


class ToyEditPairs(torch.utils.data.Dataset):
    """``n`` toy edit pairs; pair i depends only on (seed, i) (numpy SeedSequence, as ShapesDataset)."""

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        if n < 1 or size < 8:
            raise ValueError(f"need at least 1 pair and an image size >= 8 px, got n={n}, size={size}")
        self.n, self.seed, self.size = n, seed, size

    def __len__(self) -> int:
        return self.n

    def pair(self, index: int) -> tuple[ShapeSpec, ShapeSpec, str]:
        if not 0 <= index < self.n:
            raise IndexError(f"pair {index} out of range for {self.n} pairs")
        seed = derived_seed(self.seed, index)
        generator = torch.Generator().manual_seed(seed)
        before = sample_spec(generator)
        after, instruction = sample_edit(before, generator)
        return before, after, instruction

    def __getitem__(self, index: int) -> dict:
        before, after, instruction = self.pair(index)
        as_tensor = lambda spec: torch.from_numpy(render(spec, self.size)[0]).permute(2, 0, 1).float() / 255  # [3, H, W]
        return {"before": as_tensor(before), "after": as_tensor(after), "instruction": instruction}


class PairFolder(torch.utils.data.Dataset):
    """Pairs listed in ``folder/pairs.jsonl``, one JSON object a line:
    {"before": "in/0001.png", "after": "out/0001.png", "instruction": "make it snowy"} (paths relative to the
    folder). Both images are centre-cropped and resized to ``size``×``size`` (LANCZOS)."""

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        index = self.folder / "pairs.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no pair list; write one JSON object per line with keys "
                                    "before, after, instruction")
        self.rows = []
        for number, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.rows.append((row["before"], row["after"], str(row["instruction"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}:{number}: not a JSON object with before, after and instruction") from None
        if not self.rows:
            raise ValueError(f"{index}: lists no pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        before, after, instruction = self.rows[index]
        try:
            return {"before": self._load(self.folder / before), "after": self._load(self.folder / after),
                    "instruction": instruction}
        except (OSError, ValueError) as err:  # a missing or unreadable image: the stream skips the pair
            raise CorruptSample(f"pairs.jsonl row {index + 1}: {err}") from None

    def _load(self, source) -> torch.Tensor:
        """An image file or bytes -> [3, size, size] in [0, 1]."""
        image = open_rgb(source) if isinstance(source, Path) else Image.open(source).convert("RGB")
        return to_tensor(fit(image, (self.size, self.size)))[0]


PAIR_PARTS = ("before.png", "after.png", "txt")


class PairShards(PairFolder):
    """Pairs in the WebDataset tar shards of ``folder`` (KEY.before.png, KEY.after.png, KEY.txt); unreadable
    shards and incomplete samples are skipped with a warning when indexed (``self.index`` counts them)."""

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        paths = list_shards(folder)
        if not paths:
            raise FileNotFoundError(f"{folder}: no .tar shards; write them with editlab pack or make-pairs "
                                    "--format webdataset")
        self.index = index_shards(paths, PAIR_PARTS)
        if not self.index.samples:
            raise ValueError(f"{folder}: no readable pair in {len(paths)} shards (skipped: "
                             f"{'; '.join(self.index.skipped_shards) or 'incomplete samples'})")

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, index: int) -> dict:
        return decode_sample(self.index, self.index.samples[index], lambda parts: {
            "before": self._load(io.BytesIO(parts["before.png"])),
            "after": self._load(io.BytesIO(parts["after.png"])),
            "instruction": parts["txt"].decode("utf-8").strip()})


def pair_source(data: str | Path, size: int):
    """A folder of .tar shards (PairShards) or with pairs.jsonl (PairFolder)."""
    return PairShards(data, size) if list_shards(data) else PairFolder(data, size)
