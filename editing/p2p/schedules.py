"""When and where Prompt-to-Prompt edits attention: step schedules and UNet levels.

Paper: *Prompt-to-Prompt Image Editing with Cross Attention Control* (Hertz et al.), §3.2 and docs/methods.md §1.1.
N is the number of UNet calls (one per step for editlab's DDIM / DDPM / Euler samplers; no PNDM).

- cross-attention: A_j[n] ← α_j(i)[n]·E(A_0, A_j)[n] + (1 − α_j(i)[n])·A_j[n], with α_j(i)[n] = 1 for the
  first ⌊N·b⌋ calls and 0 after; b is one fraction, or a fraction per word overriding the word's tokens in
  each edited prompt (the notebook's {"default_": b, "word": b_w}).
- self-attention: A_j ← A_0 for calls ⌊N·s_0⌋ ≤ i < ⌊N·s_1⌋, only in layers at or below a resolution.

Resolutions are UNet levels, not query counts (docs/methods.md §0.6): level ℓ has maps of side
⌈latent side / 2^ℓ⌉.
The default "map level" is min(2, deepest down/up level with attention): level 2 is 16² for SD at 512 px
(24² at 768), the maps the paper's code stores, blends and shows; the toy model's deepest is level 1 (8²).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ldm.attention import attention_layers
from ldm.tokenizer import Tokenizer

from .alignment import word_positions_in


def calls_for(fraction: float, steps: int) -> int:
    """⌊N·fraction⌋ (with a 1e-9 guard so that 0.57·100 counts as 57, not 56)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a replacement fraction must lie in [0, 1], got {fraction}")
    return math.floor(fraction * steps + 1e-9)


def cross_replace_alphas(tokenizer: Tokenizer, edited_prompts: Sequence[str], steps: int, fraction: float,
                         per_word: Mapping[str, float] | None = None) -> torch.Tensor:
    """α [N, B−1, L]: 1 where edited prompt b takes the edited cross-attention for token n at call i."""
    alphas = torch.zeros(steps, len(edited_prompts), tokenizer.max_length)
    alphas[: calls_for(fraction, steps)] = 1.0
    for word, word_fraction in (per_word or {}).items():
        end = calls_for(word_fraction, steps)
        for row, positions in enumerate(word_positions_in(tokenizer, edited_prompts, word, "cross-replace")):
            alphas[:, row, positions] = 0.0
            alphas[:end, row, positions] = 1.0
    return alphas


def self_replace_calls(bounds: tuple[float, float], steps: int) -> range:
    """The calls ⌊N·s_0⌋ ≤ i < ⌊N·s_1⌋ that replace self-attention."""
    start, end = bounds
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"self-replace bounds must satisfy 0 <= start <= end <= 1, got ({start}, {end})")
    return range(calls_for(start, steps), calls_for(end, steps))


def default_map_level(unet) -> int:
    """min(2, the deepest level of a down/up attention layer): SD's 16² at 512 px, the toy model's 8²."""
    levels = [layer.level for name, layer in attention_layers(unet).items() if not name.startswith("mid.")]
    if not levels:
        raise ValueError("this UNet has no attention layers outside the middle block; Prompt-to-Prompt "
                         "needs cross-attention in the down/up levels")
    return min(2, max(levels))


def level_shape(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Query map side at a UNet level: each downsampler (3×3, stride 2, padding 1) gives ⌈side/2⌉."""
    height, width = latent_hw
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width
