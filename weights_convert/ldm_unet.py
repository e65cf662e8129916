"""LDM UNet names (CompVis ``openaimodel.UNetModel``) -> editlab's (= diffusers') UNet names.

docs/checkpoints.md §5. The LDM model keeps flat block lists; editlab groups them per level. With
L = ResBlocks per encoder level (the decoder has L + 1), the index arithmetic is::

    input_blocks.{i}.0      -> down_blocks.{(i-1)//(L+1)}.resnets.{(i-1)%(L+1)}        i >= 1
    input_blocks.{i}.1      -> down_blocks.{(i-1)//(L+1)}.attentions.{(i-1)%(L+1)}
    input_blocks.{i}.0.op   -> down_blocks.{(i-1)//(L+1)}.downsamplers.0.conv          (slot L of a level)
    middle_block.{0,1,2}    -> mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.{i}.0     -> up_blocks.{i//(L+1)}.resnets.{i%(L+1)}
    output_blocks.{i}.1     -> up_blocks.{i//(L+1)}.attentions.{i%(L+1)}
    output_blocks.{i}.{1|2}.conv -> up_blocks.{i//(L+1)}.upsamplers.0.conv   (1 without attention, 2 with)

plus a fixed table for the stem and head and six ResBlock leaf renames. The spatial transformers keep their
leaf names. EMA weights (``model_ema.*``) use the same rules: their names are derived from the raw key
(docs/checkpoints.md §4), never parsed back.
"""

from __future__ import annotations

import re

import torch

from ldm.model import WeightsError

from .report import Mapping

PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."

FIXED = {  # LDM module -> editlab module
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

RESBLOCK_LEAVES = {  # LDM ResBlock layer -> diffusers ResnetBlock2D layer
    "in_layers.0": "norm1",  # GroupNorm
    "in_layers.2": "conv1",  # 3×3 (index 1 is SiLU)
    "emb_layers.1": "time_emb_proj",  # Linear (index 0 is SiLU)
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",  # 3×3 (index 2 is Dropout)
    "skip_connection": "conv_shortcut",  # 1×1, only where the channel count changes
}


def ema_key(raw_key: str) -> str:
    """The EMA copy's name of UNet key ``model.diffusion_model.<path>``: ``model_ema.diffusion_model`` + <path>
    with every dot removed, e.g. ``model_ema.diffusion_modelinput_blocks00weight``."""
    assert raw_key.startswith(PREFIX), raw_key
    return EMA_PREFIX + "diffusion_model" + raw_key[len(PREFIX):].replace(".", "")


def layers_per_level(paths: list[str]) -> int:
    """L from the block lists: the encoder has ``levels`` × (L + 1) input blocks in all (conv_in counts as
    the missing downsampler slot of the last level)."""
    inputs = {int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.", p))}
    downsamplers = {int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", p))}
    if not inputs:
        raise WeightsError("the UNet has no input_blocks: not an LDM UNet")
    levels = len(downsamplers) + 1
    if len(inputs) % levels:
        raise WeightsError(f"the UNet's {len(inputs)} input blocks do not split into {levels} equal levels")
    return len(inputs) // levels - 1


def _resblock(leaf: str) -> str | None:
    for ldm, ours in RESBLOCK_LEAVES.items():
        if leaf.startswith(ldm + "."):
            return ours + leaf[len(ldm):]
    return None


def unet_key(path: str, L: int) -> str | None:
    """editlab name of one LDM UNet key (without ``model.diffusion_model.``); None if no rule matches."""
    for ldm, ours in FIXED.items():
        if path.startswith(ldm + "."):
            return ours + path[len(ldm):]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.(.+)", path):
        i = int(m.group(1))
        return f"down_blocks.{(i - 1) // (L + 1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", path):
        level, slot = divmod(int(m.group(1)) - 1, L + 1)
        return _block(f"down_blocks.{level}", slot, m.group(2), m.group(3))
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", path):
        k = int(m.group(1))
        return _block("mid_block", k // 2, "0" if k % 2 == 0 else "1", m.group(2))
    if m := re.fullmatch(r"output_blocks\.(\d+)\.[12]\.conv\.(.+)", path):
        return f"up_blocks.{int(m.group(1)) // (L + 1)}.upsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([01])\.(.+)", path):
        level, slot = divmod(int(m.group(1)), L + 1)
        return _block(f"up_blocks.{level}", slot, m.group(2), m.group(3))
    return None


def _block(level: str, slot: int, kind: str, leaf: str) -> str | None:
    """kind "0" is a ResBlock (leaf renamed), kind "1" a spatial transformer (leaf kept)."""
    if kind == "0":
        leaf = _resblock(leaf)
        return None if leaf is None else f"{level}.resnets.{slot}.{leaf}"
    return f"{level}.attentions.{slot}.{leaf}"


def convert_ldm_unet(source: dict[str, torch.Tensor], use_ema: bool) -> Mapping:
    """Map every ``model.diffusion_model.*`` key of ``source`` to editlab's UNet names.

    With ``use_ema`` each tensor is taken from its EMA copy instead (the raw key is then ignored); a missing
    EMA copy leaves its target unfilled, which the strict check reports.
    """
    mapping = Mapping()
    raw_keys = [k for k in source if k.startswith(PREFIX)]
    L = layers_per_level([k[len(PREFIX):] for k in raw_keys])
    for key in raw_keys:
        target = unet_key(key[len(PREFIX):], L)
        if target is None:
            mapping.unknown(key)
        elif not use_ema:
            mapping.add(key, target, source[key])
        else:
            mapping.ignore(key, "raw UNet weights; the EMA copy is used instead")
            if ema_key(key) in source:
                mapping.add(ema_key(key), target, source[ema_key(key)])
    return mapping


def has_ema(source: dict[str, torch.Tensor]) -> bool:
    """True when the file carries an EMA copy of the UNet (checked on conv_in's derived EMA name)."""
    return ema_key(PREFIX + "input_blocks.0.0.weight") in source
