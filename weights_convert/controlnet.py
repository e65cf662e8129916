"""Released ControlNets -> editlab's ControlNet file (docs/checkpoints.md §10, §5, §3).

Three sources:
- original files (lllyasviel/ControlNet): every ControlNet tensor under ``control_model.``. The v1.0 files
  (``control_sd15_*.pth``) also carry a whole SD 1.5 (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``): only ``control_model.*`` is taken, the rest is reported as ignored. v1.1 files
  hold ``control_model.*`` only.
- diffusers ``ControlNetModel`` folders (config.json + diffusion_pytorch_model.*) or lone weight files:
  editlab's names are diffusers' names, so the mapping is the identity.

Original names -> editlab (= diffusers) names, after stripping ``control_model.``::

    time_embed.*, input_blocks.*, middle_block.*  -> the UNet rules (ldm_unet.unet_key)
    input_hint_block.0                            -> controlnet_cond_embedding.conv_in
    input_hint_block.{2, 4, ..., 2n}              -> controlnet_cond_embedding.blocks.{0, ..., n−1}
    input_hint_block.{2n+2} (the last conv)       -> controlnet_cond_embedding.conv_out
    zero_convs.{i}.0                              -> controlnet_down_blocks.{i}
    middle_block_out.0                            -> controlnet_mid_block

(odd ``input_hint_block`` indices are SiLUs, without weights). The architecture is read from the shapes;
head counts follow the family (SD 1: 8 heads, SD 2: head size 64, told apart by the text width 768/1024),
or come from the UNetConfig passed in.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from safetensors import safe_open

from controls.controlnet import ControlNet, ControlNetConfig
from ldm.config import UNetConfig
from ldm.model import WeightsError

from . import architecture
from .diffusers_folder import weight_files
from .files import read_checkpoint, read_json, sha256_of, sniff_format
from .ldm_unet import layers_per_level, unet_key
from .report import ConversionReport, Mapping, assemble

PREFIX = "control_model."
DIFFUSERS_SENTINEL = "controlnet_cond_embedding.conv_in.weight"
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2"}


def is_controlnet(src: str | Path) -> bool:
    """True for a diffusers ControlNetModel folder or a file with original or diffusers ControlNet keys."""
    src = Path(src)
    if src.is_dir():
        config = src / "config.json"
        return config.is_file() and read_json(config).get("_class_name") == "ControlNetModel"
    if not src.is_file():
        return False
    try:
        if sniff_format(src) == "safetensors":
            with safe_open(str(src), framework="pt") as f:
                keys = list(f.keys())
        else:
            keys = list(read_checkpoint(src).tensors)
    except Exception:  # damaged or foreign files: the regular converter reports them in one line
        return False
    return any(k.startswith(PREFIX) or k == DIFFUSERS_SENTINEL for k in keys)


def controlnet_key(path: str, L: int, last_hint: int) -> str | None:
    """editlab name of one original key (without ``control_model.``); None if no rule matches."""
    if m := re.fullmatch(r"input_hint_block\.(\d+)\.(weight|bias)", path):
        k, leaf = int(m.group(1)), m.group(2)
        if k == 0:
            return f"controlnet_cond_embedding.conv_in.{leaf}"
        if k == last_hint:
            return f"controlnet_cond_embedding.conv_out.{leaf}"
        return f"controlnet_cond_embedding.blocks.{k // 2 - 1}.{leaf}" if k % 2 == 0 else None
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", path):
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", path):
        return f"controlnet_mid_block.{m.group(1)}"
    target = unet_key(path, L)
    if target is None or target.startswith(("up_blocks.", "conv_out.", "conv_norm_out.")):
        return None  # a ControlNet has no decoder
    return target


def convert_original(tensors: dict[str, torch.Tensor]) -> Mapping:
    """Map every ``control_model.*`` key; every other key is ignored with the reason."""
    mapping = Mapping()
    paths = [k[len(PREFIX):] for k in tensors if k.startswith(PREFIX)]
    L = layers_per_level([p for p in paths if p.startswith("input_blocks.")])
    hints = [int(m.group(1)) for p in paths if (m := re.match(r"input_hint_block\.(\d+)\.", p))]
    last_hint = max(hints, default=-1)
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            mapping.ignore(key, "not part of the ControlNet (v1.0 files bundle a whole SD 1.5; load the base "
                                "model separately)")
        elif (target := controlnet_key(key[len(PREFIX):], L, last_hint)) is None:
            mapping.unknown(key)
        else:
            mapping.add(key, target, tensor)
    return mapping


def config_from_tensors(t: dict[str, torch.Tensor], unet: UNetConfig | None = None) -> ControlNetConfig:
    """ControlNetConfig from editlab-named tensors; ``unet`` (if given) supplies what shapes cannot tell."""
    conv_in = architecture._need(t, DIFFUSERS_SENTINEL, "ControlNet hint encoder")
    n_blocks = architecture._count(t, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    strided = range(1, n_blocks, 2)  # blocks 1, 3, 5: the stride-2 convs, which change the width
    hint = (conv_in.shape[0], *(t[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in strided))
    if unet is None:
        attn = next((v for k, v in t.items() if k.endswith("attn2.to_k.weight")), None)
        family = CONTEXT_FAMILY.get(attn.shape[1]) if attn is not None else None
        if family is None:
            raise WeightsError("cannot tell the ControlNet's base model from its text width; pass its config "
                               "(--config PRESET)")
        in_ch = architecture._need(t, "conv_in.weight", "ControlNet").shape[1]
        placeholder = torch.empty((in_ch, 1), device="meta")  # a ControlNet has no conv_out; out = in channels
        unet = architecture.unet_config({**t, "conv_out.weight": placeholder}, family)
    return ControlNetConfig(unet=unet, hint_channels=tuple(hint), conditioning_channels=conv_in.shape[1])


def config_from_diffusers(raw: dict, src: Path) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNetModel config.json."""
    if raw.get("global_pool_conditions") or raw.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise WeightsError(f"{src}: global-pool or BGR ControlNets are not supported by editlab")
    channels = tuple(raw["block_out_channels"])
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)  # diffusers: a head count
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    head_sizes = {c // h for c, h in zip(channels, heads)}
    per_head = dict(n_heads=heads[0], head_dim=None) if len(set(heads)) == 1 else \
        dict(n_heads=None, head_dim=head_sizes.pop()) if len(head_sizes) == 1 else None
    if per_head is None:
        raise WeightsError(f"{src}: head counts {heads} are neither constant nor of constant size")
    unet = UNetConfig(
        in_channels=raw.get("in_channels", 4), model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        attention_levels=tuple(t.startswith("CrossAttn") for t in raw["down_block_types"]),
        layers_per_level=raw.get("layers_per_block", 2), context_dim=raw["cross_attention_dim"],
        linear_projection=raw.get("use_linear_projection", False), upcast_attention=raw.get("upcast_attention", False),
        norm_groups=raw.get("norm_num_groups", 32), **per_head)
    hint = raw.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return ControlNetConfig(unet=unet, hint_channels=tuple(hint),
                            conditioning_channels=raw.get("conditioning_channels", 3))


def to_diffusers_config(cfg: ControlNetConfig) -> dict:
    """editlab ControlNetConfig -> diffusers ControlNetModel kwargs (the inverse of config_from_diffusers)."""
    unet = cfg.unet
    heads = [unet.heads_at(ch) for ch in unet.level_channels]
    return dict(in_channels=unet.in_channels, conditioning_channels=cfg.conditioning_channels,
                flip_sin_to_cos=True, freq_shift=0, block_out_channels=unet.level_channels,
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet.attention_levels),
                layers_per_block=unet.layers_per_level, cross_attention_dim=unet.context_dim,
                attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
                use_linear_projection=unet.linear_projection, upcast_attention=unet.upcast_attention,
                norm_num_groups=unet.norm_groups, conditioning_embedding_out_channels=cfg.hint_channels)


def convert_controlnet(src: str | Path, dst: str | Path, unet: UNetConfig | None = None,
                       dtype: torch.dtype | None = None) -> ConversionReport:
    """Convert an original or diffusers ControlNet into an editlab ControlNet file at ``dst``."""
    src = Path(src)
    if src.is_dir():
        files = weight_files(src)
        mapping, cfg = Mapping(), config_from_diffusers(read_json(src / "config.json"), src)
        for file in files:
            for key, tensor in read_checkpoint(file).tensors.items():
                mapping.add(key, key, tensor)
        if unet is not None:
            cfg = dataclasses.replace(cfg, unet=unet)
        files, layout = [src / "config.json", *files], "diffusers"
    else:
        checkpoint = read_checkpoint(src)
        if any(k.startswith(PREFIX) for k in checkpoint.tensors):
            mapping, layout = convert_original(checkpoint.tensors), "original"
        else:
            mapping, layout = Mapping(), "diffusers-file"
            for key, tensor in checkpoint.tensors.items():
                mapping.add(key, key, tensor)
        mapping.ignored.update(checkpoint.skipped)
        cfg, files = config_from_tensors(mapping.tensors, unet), [src]
    with torch.device("meta"):
        target = ControlNet(cfg)
    tensors, report = assemble(mapping, target, str(src), {"layout": layout, "model": "controlnet"})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        net = ControlNet(cfg)
    net.load_state_dict(tensors, strict=True, assign=True)
    net.save(dst, {"source": src.name, "source_sha256": sha256_of(files, src if src.is_dir() else None),
                   "source_layout": layout, "converter": "editlab weights_convert"})
    return report
