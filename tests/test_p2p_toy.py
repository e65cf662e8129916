"""Prompt-to-Prompt on the bundled toy model, judged on meaning: swapping the object word "circle" ->
"square" keeps the object where it was (mask IoU >= 0.7 between source and edit; a circle and a square at the
same place and size overlap with IoU 0.785, other shape pairs less) and turns it into a square, in at least
80% of seeds. Read with ldm/toy/readers.py."""

import numpy as np
import pytest
import torch

from editing.options import TOY_WEIGHTS
from editing.p2p.edit import P2PConfig, prompt_to_prompt
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents
from ldm.toy.readers import mask_iou, object_mask, read_shape

SOURCE, TARGET = "a red circle on a blue background", "a red square on a blue background"
SEEDS = range(10)

pytestmark = pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason=f"toy weights {TOY_WEIGHTS} not present yet "
                                "(trained by ldm/toy/train.py); the semantic P2P check needs them")


def as_rgb(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy().astype(np.float64)  # [3, H, W] in [0, 1] -> [H, W, 3]


def test_swapping_circle_for_square_keeps_the_place_and_changes_the_shape():
    model = StableDiffusion.load(TOY_WEIGHTS)
    outcomes = []
    for seed in SEEDS:
        cfg = SamplingConfig(steps=20, guidance=7.5, height=64, width=64, seed=seed)
        result = prompt_to_prompt(model, SOURCE, TARGET, cfg, P2PConfig(store=False))
        source, edited = (as_rgb(image) for image in decode_latents(model, result.latents))
        source_mask, edited_mask = object_mask(source), object_mask(edited)
        outcomes.append((read_shape(source, source_mask), read_shape(edited, edited_mask),
                         mask_iou(source_mask, edited_mask) if source_mask.any() else 0.0))
    kept_and_changed = [edit == "square" and iou >= 0.7 for _, edit, iou in outcomes]
    assert sum(kept_and_changed) >= 0.8 * len(SEEDS), outcomes
