"""Per-token cross-attention maps as one labelled image grid (the figure style of Prompt-to-Prompt, Hertz et
al., Fig. 3; google/prompt-to-prompt ``show_cross_attention``).

One tile per token of the prompt, start and end tokens included, each the map averaged over heads, over the
layers of one UNet level and over steps (AttentionStore.average_maps), scaled so that its maximum is white,
with the token's text under it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.tokenizer import Tokenizer

from .alignment import token_ids

LABEL_HEIGHT = 14  # pixels of text under each tile


def token_labels(tokenizer: Tokenizer, prompt: str) -> list[str]:
    """The text of every token the encoder sees: '<start>', the BPE pieces, '<end>'."""
    ids = token_ids(tokenizer, prompt)
    return ["<start>"] + [tokenizer.decode([i]).strip() for i in ids[1:-1]] + ["<end>"]


def attention_grid(tokenizer: Tokenizer, prompt: str, maps: torch.Tensor, tile: int = 96,
                   columns: int = 8) -> torch.Tensor:
    """maps [h, w, K] of one prompt -> image [3, H, W] in [0, 1]: one labelled tile per token."""
    labels = token_labels(tokenizer, prompt)
    if maps.ndim != 3 or maps.shape[-1] < len(labels):
        raise ValueError(f"maps must be [h, w, K] with K >= {len(labels)} tokens, got {tuple(maps.shape)}")
    columns = min(columns, len(labels))
    rows = -(-len(labels) // columns)  # ⌈tokens / columns⌉
    canvas = Image.new("RGB", (columns * tile, rows * (tile + LABEL_HEIGHT)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for k, label in enumerate(labels):
        token_map = maps[..., k].detach().float().cpu()
        token_map = token_map / token_map.max().clamp_min(1e-12)  # brightest = 1
        pixels = (token_map.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        tile_image = Image.fromarray(pixels).resize((tile, tile), Image.BILINEAR).convert("RGB")
        x, y = (k % columns) * tile, (k // columns) * (tile + LABEL_HEIGHT)
        canvas.paste(tile_image, (x, y))
        text = label if draw.textlength(label, font=font) <= tile - 4 else label[: max(1, tile // 7)] + ".."
        draw.text((x + 2, y + tile + 1), text, fill="black", font=font)
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
