"""VAE names: LDM (CompVis ``diffusionmodules/model.py``) and old diffusers -> editlab's (= diffusers') names.

docs/checkpoints.md §6. With n encoder levels::

    encoder.down.{i}.block.{j}          -> encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample.conv    -> encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{k}.block.{j}            -> decoder.up_blocks.{n-1-k}.resnets.{j}      (LDM stores the decoder
    decoder.up.{k}.upsample.conv        -> decoder.up_blocks.{n-1-k}.upsamplers.0.conv  shallowest level first)
    {encoder,decoder}.mid.block_{1,2}   -> ….mid_block.resnets.{0,1}
    {encoder,decoder}.mid.attn_1.{norm,q,k,v,proj_out} -> ….mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    {encoder,decoder}.norm_out          -> ….conv_norm_out;   ResNet nin_shortcut -> conv_shortcut

The attention's q, k, v, proj_out are 1×1 convs [C, C, 1, 1] in LDM and Linear [C, C] here: squeezed.
Older diffusers VAEs call the attention layers query, key, value, proj_attn (renamed here too).
"""

from __future__ import annotations

import re

import torch

from .report import Mapping

PREFIXES = ("first_stage_model.", "vae.")  # in full checkpoints; standalone VAE files have none

ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _levels(paths: list[str]) -> int:
    return len({m.group(1) for p in paths if (m := re.match(r"encoder\.down\.(\d+)\.", p))})


def vae_key(path: str, n_levels: int) -> str | None:
    """editlab name of one LDM VAE key (without prefix); None if no rule matches."""
    path = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", path)
    path = path.replace(".nin_shortcut.", ".conv_shortcut.")
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.\w+|(post_)?quant_conv\.\w+", path):
        return path
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", path):
        return f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{m.group(3)}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", path):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", path):
        return f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.{m.group(3)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", path):
        return f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", path):
        return f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{m.group(3)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", path):
        leaf = ATTENTION_LEAVES.get(m.group(2))
        return None if leaf is None else f"{m.group(1)}.mid_block.attentions.0.{leaf}.{m.group(3)}"
    return None


def diffusers_vae_key(path: str) -> str:
    """Current diffusers names are editlab's; old ones name the mid attention query/key/value/proj_attn."""
    m = re.fullmatch(r"(.+\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)", path)
    return f"{m.group(1)}.{OLD_DIFFUSERS_ATTENTION[m.group(2)]}.{m.group(3)}" if m else path


def as_linear(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """1×1 conv weights [C, C, 1, 1] (or conv1d [C, C, 1]) of the mid attention -> Linear [C, C]."""
    if ".attentions.0." in key and key.endswith(".weight") and tensor.ndim > 2 and "group_norm" not in key:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def is_ldm_vae(paths: list[str]) -> bool:
    return any(p.startswith("encoder.down.") for p in paths)


def convert_vae(source: dict[str, torch.Tensor], prefix: str = "") -> Mapping:
    """Map the VAE keys under ``prefix`` (LDM or diffusers names, told apart by ``encoder.down.``)."""
    mapping = Mapping()
    keys = [k for k in source if k.startswith(prefix)]
    paths = [k[len(prefix):] for k in keys]
    ldm, n_levels = is_ldm_vae(paths), _levels(paths)
    for key, path in zip(keys, paths):
        target = vae_key(path, n_levels) if ldm else diffusers_vae_key(path)
        if target is None:
            mapping.unknown(key)
        else:
            mapping.add(key, target, as_linear(target, source[key]))
    return mapping
