"""InstantStyle (*InstantStyle: Free Lunch towards Style-Preserving in Text-to-Image Generation*, Wang et al.
2024; docs/methods.md §9) on IP-Adapter (controls/ip_adapter.py). Two training-free changes:

1. Content subtraction in CLIP space, before the adapter's projection (no normalisation of either vector):

       e' = e_img(style image) − λ_c · t_content        (paper §3.2; λ_c = 0.8 in the SD 1.5 demo)

   t_content is the projected CLIP text embedding of a content prompt from the same CLIP model (for
   IP-Adapter SD 1.5: the full 24-layer OpenCLIP ViT-H text tower with text_projection, not SD 2's 23 layers).
2. Block selection: the image branch runs only in chosen cross-attention blocks; elsewhere its scale is 0
   and the layer is plain text cross-attention. SD 1.5 presets (experimental in InstantStyle):
   "style" = up_blocks.1; "style+layout" = up_blocks.1 + down_blocks.2 + mid_block.

Blocks are named as diffusers names them ("up_blocks.1", "down_blocks.2.attentions.1", "mid_block") or in
diffusers' ``set_ip_adapter_scale`` dict ({"down": {"block_2": [1, 1]}, "mid": 1, "up": {"block_1": 1}}).
A block that matches no layer is an error, never a silent no-op: the SDXL recipe {"up": {"block_0": ...}}
would otherwise switch the adapter off on SD 1.5 (docs/methods.md §9.3 item 1).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import nn

from controls.ip_adapter import IPAdapter, diffusers_block, generate_with_image_prompt
from ldm.attention import attention_layers
from ldm.pipeline import SamplingConfig

STYLE_PRESETS = {  # SD 1.5 (docs/methods.md §9.1); unnamed blocks get scale 0
    "style": ("up_blocks.1",),
    "style+layout": ("down_blocks.2", "mid_block", "up_blocks.1"),
}
CONTENT_SCALE = 0.8  # λ_c of InstantStyle's SD 1.5 demo


def subtract_content(image_embeds: torch.Tensor, content_embeds: torch.Tensor,
                     strength: float = CONTENT_SCALE) -> torch.Tensor:
    """e' = e_img − λ_c·t_content (CLIP space, before the adapter's projection; no normalisation)."""
    if image_embeds.shape[-1] != content_embeds.shape[-1]:
        raise ValueError(f"image embedding width {image_embeds.shape[-1]} differs from the content embedding's "
                         f"{content_embeds.shape[-1]}; use the text tower of the same CLIP model (with projection)")
    return image_embeds - strength * content_embeds.to(image_embeds.dtype)


@torch.no_grad()
def content_embedding(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """t_content [1, D]: the projected CLIP text embedding of ``prompt`` (hidden state at the end token)."""
    if getattr(text_encoder, "text_projection", None) is None:
        raise ValueError("the content prompt needs a CLIP text tower with text_projection (OpenCLIP ViT-H/14, "
                         "24 layers, for IP-Adapter SD 1.5); this text encoder has none")
    ids = tokenizer([prompt]).to(text_encoder.text_projection.weight.device)
    return text_encoder.pooled(text_encoder(ids), ids)


def _cross_layers(unet: nn.Module) -> list[str]:
    return [name for name, layer in attention_layers(unet).items() if layer.kind == "cross"]


def block_layers(unet: nn.Module, block: str) -> list[str]:
    """editlab cross-attention layers of a diffusers-named block ("up_blocks.1", "mid_block",
    "down_blocks.2.attentions.1"). Raises ValueError when the name is malformed or matches no layer."""
    if not re.fullmatch(r"(down_blocks|up_blocks)\.\d+(\.attentions\.\d+)?|mid_block(\.attentions\.0)?", block):
        raise ValueError(f"block {block!r} is not a diffusers block name; use e.g. down_blocks.2, up_blocks.1, "
                         "mid_block or up_blocks.1.attentions.0")
    layers = [name for name in _cross_layers(unet)
              if diffusers_block(name) == block or diffusers_block(name).startswith(block + ".")]
    if not layers:
        blocks = sorted({diffusers_block(name).rsplit(".attentions", 1)[0] for name in _cross_layers(unet)})
        raise ValueError(f"block {block!r} has no cross-attention layer in this model; its blocks with "
                         f"attention are {blocks}")
    return layers


def _flatten_diffusers_spec(spec: Mapping) -> list[tuple[str, float | Sequence[float]]]:
    """{"down": {"block_2": [1, 1]}, "mid": 1, "up": {"block_1": 1}} -> [("down_blocks.2", [1, 1]), ...]."""
    entries = []
    for part, value in spec.items():
        if part == "mid":
            entries.append(("mid_block", value))
        elif part in ("down", "up") and isinstance(value, Mapping):
            for key, scales in value.items():
                m = re.fullmatch(r"block_(\d+)", str(key))
                if m is None:
                    raise ValueError(f"{part}.{key}: expected keys block_0, block_1, ... in a {part!r} entry")
                entries.append((f"{part}_blocks.{m.group(1)}", scales))
        else:
            raise ValueError(f"scale entry {part!r} is neither a diffusers block name nor 'down'/'mid'/'up'")
    return entries


def block_scales(unet: nn.Module, spec: Mapping) -> dict[str, float]:
    """{editlab layer name: λ} for a block specification; layers it does not name get 0 (and no hook).

    ``spec``: {block name: λ or [λ per attention]} and/or diffusers' nested {"down"/"mid"/"up": ...} form.
    Later entries override earlier ones, so {"up_blocks.1": 1, "up_blocks.1.attentions.0": 0.5} works.
    """
    nested = {k: v for k, v in spec.items() if k in ("down", "mid", "up")}
    entries = _flatten_diffusers_spec(nested) + [(k, v) for k, v in spec.items() if k not in nested]
    scales: dict[str, float] = {}
    for block, value in entries:
        layers = block_layers(unet, block)
        if isinstance(value, (int, float)):
            scales.update({name: float(value) for name in layers})
            continue
        values = list(value)
        if len(values) != len(layers):
            raise ValueError(f"{block}: {len(values)} scales for its {len(layers)} attention layers; give one "
                             f"per layer or a single number")
        scales.update({name: float(s) for name, s in zip(layers, values)})
    return scales


def preset_scales(unet: nn.Module, preset: str, scale: float = 1.0) -> dict[str, float]:
    """λ = ``scale`` in the preset's blocks (``STYLE_PRESETS``), 0 elsewhere."""
    if preset not in STYLE_PRESETS:
        raise ValueError(f"unknown InstantStyle preset {preset!r}; choose one of {sorted(STYLE_PRESETS)}")
    return block_scales(unet, {block: scale for block in STYLE_PRESETS[preset]})


@torch.no_grad()
def instant_style(model, adapter: IPAdapter, style_embeds: torch.Tensor, prompts: Sequence[str],
                  scales: Mapping[str, float], content_embeds: torch.Tensor | None = None,
                  content_scale: float = CONTENT_SCALE, cfg: SamplingConfig = SamplingConfig(),
                  negative: str | Sequence[str] | None = None, progress: bool = True) -> torch.Tensor:
    """Stylised text-to-image; returns the final latents. ``scales``: {layer name: λ} from ``block_scales``
    or ``preset_scales``; ``content_embeds``: t_content to subtract (None: no subtraction)."""
    embeds = style_embeds if content_embeds is None else subtract_content(style_embeds, content_embeds, content_scale)
    return generate_with_image_prompt(model, adapter, embeds, prompts, dict(scales), cfg, negative, progress=progress)
