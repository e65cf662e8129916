"""InstructPix2Pix's paired-data recipe in the toy world: toy caption pairs, and the toy readers as the filter.

The paper (*InstructPix2Pix*, Brooks et al., CVPR 2023, §3.1; docs/methods.md §6.2) writes caption pairs with a
language model and filters the rendered pairs with CLIP. The toy world needs neither:

- caption pairs: a random toy spec and one random edit of it (data.sample_edit: object colour, shape
  or background), written with shapes.caption, e.g. ("a red circle on a blue background",
  "make the circle green", "a green circle on a blue background");
- filter (``ToyFilter``), with the readers of ldm/toy/readers.py in place of CLIP:

      image-text    before reads as c_0 and after reads as c_1: object colour, shape and background
      image-image   colour and background edits keep the object in place:
                    IoU(M_0, M_1) = |M_0 ∩ M_1| / |M_0 ∪ M_1| ≥ min_iou (0.7)
                    (a shape edit changes the mask itself, so it is not held to the IoU)

  The survivors of one caption pair are ranked by IoU (largest first) and at most K are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.toy.readers import mask_iou, object_mask, read_background, read_colour, read_shape
from ldm.toy.shapes import caption, parse_caption

from .data import ToyEditPairs

ATTRIBUTES = ("colour", "shape", "background")


def toy_caption_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` toy caption pairs in make-pairs' format {"input", "edit", "output"}; pair i depends only on
    (seed, i) (the specs and edits of ToyEditPairs)."""
    if n < 1:
        raise ValueError(f"asked for {n} toy caption pairs; ask for at least 1")
    pairs = ToyEditPairs(n, seed)
    rows = []
    for index in range(n):
        before, after, instruction = pairs.pair(index)
        rows.append({"input": caption(before), "edit": instruction, "output": caption(after)})
    return rows


def check_toy_caption(text: str) -> dict[str, str | None]:
    """The attributes a toy caption names; a caption outside the toy grammar is a one-line ValueError."""
    try:
        return parse_caption(text)
    except ValueError as err:
        raise ValueError(f"--filter toy reads toy captions only: {err}") from None


def read_image(image: torch.Tensor) -> dict:
    """{colour, shape, background, mask} of one decoded image [3, H, W] in [0, 1]."""
    rgb = image.detach().cpu().permute(1, 2, 0).double().numpy()  # [3, H, W] -> [H, W, 3], float in [0, 1]
    mask = object_mask(rgb)
    return {"colour": read_colour(rgb, mask), "shape": read_shape(rgb, mask), "background": read_background(rgb),
            "mask": mask}


def reads_as(reads: dict, words: dict) -> bool:
    """Every attribute the caption names is the one read (a caption without background skips it)."""
    return all(words[name] is None or reads[name] == words[name] for name in ATTRIBUTES)


@dataclass(frozen=True)
class ToyFilter:
    """The toy analogue of the CLIP filters (module doc). Same interface as pairs.ClipFilter."""

    min_iou: float = 0.7  # IoU(M_0, M_1) for colour and background edits
    keep: int = 4  # at most K kept per caption pair

    def __post_init__(self):
        if not 0.0 <= self.min_iou <= 1.0 or self.keep < 1:
            raise ValueError(f"min_iou {self.min_iou} must lie in [0, 1] and keep {self.keep} be >= 1")

    def describe(self) -> str:
        return (f"the toy filters (before and after read as their captions, mask IoU >= {self.min_iou} for colour "
                "and background edits); lower --min-iou or raise --samples")

    def scores(self, before: str, after: str, images: torch.Tensor) -> dict:
        """The reads of one sample (images [2, 3, H, W] in [0, 1]: before, after) and its verdict."""
        words = [check_toy_caption(before), check_toy_caption(after)]
        reads = [read_image(image) for image in images]
        iou = mask_iou(reads[0]["mask"], reads[1]["mask"])  # |M_0 ∩ M_1| / |M_0 ∪ M_1|
        shape_edit = words[0]["shape"] != words[1]["shape"]
        passes = reads_as(reads[0], words[0]) and reads_as(reads[1], words[1]) and (shape_edit or iou >= self.min_iou)
        scores = {f"{row}_{name}": r[name] for row, r in zip(("before", "after"), reads) for name in ATTRIBUTES}
        return {**scores, "iou": iou, "passes": passes}

    def select(self, scores: list[dict]) -> list[int]:
        """Indices of the kept samples: those passing, by IoU from the largest, at most K."""
        passing = [index for index, s in enumerate(scores) if s["passes"]]
        return sorted(passing, key=lambda index: -scores[index]["iou"])[: self.keep]
