"""IP-Adapter SD 1.5 and SDXL weights (tencent-ailab/IP-Adapter) -> editlab's ``IPAdapter`` (docs/checkpoints.md §9.1).

- ``.bin``: a pickle ``{"image_proj": {...}, "ip_adapter": {...}}``, read with ``weights_only=True`` only;
- ``.safetensors``: the same tensors flat, prefixed ``image_proj.`` / ``ip_adapter.``.

editlab's parameter names are the official ones, so the conversion is the identity; what it checks is that
the keys ``ip_adapter.{k}`` land on the right layers. k counts every attention processor of the UNet in
diffusers' module registration order (down, up, mid), odd k being the cross-attentions; editlab builds that
table from its own modules (``controls.ip_adapter.processor_table``) and, for the SD 1.5 layout, checks it
against the published one below. Loading is strict, with a report.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from controls.ip_adapter import IPAdapter, diffusers_block, processor_table
from ldm.model import WeightsError

from .files import read_checkpoint
from .report import ConversionReport, Mapping, assemble

# docs/checkpoints.md §9.1: processor index k -> (diffusers attention block, width) for SD 1.5
SD15_PROCESSOR_TABLE = {
    1: ("down_blocks.0.attentions.0", 320), 3: ("down_blocks.0.attentions.1", 320),
    5: ("down_blocks.1.attentions.0", 640), 7: ("down_blocks.1.attentions.1", 640),
    9: ("down_blocks.2.attentions.0", 1280), 11: ("down_blocks.2.attentions.1", 1280),
    13: ("up_blocks.1.attentions.0", 1280), 15: ("up_blocks.1.attentions.1", 1280),
    17: ("up_blocks.1.attentions.2", 1280),
    19: ("up_blocks.2.attentions.0", 640), 21: ("up_blocks.2.attentions.1", 640),
    23: ("up_blocks.2.attentions.2", 640),
    25: ("up_blocks.3.attentions.0", 320), 27: ("up_blocks.3.attentions.1", 320),
    29: ("up_blocks.3.attentions.2", 320),
    31: ("mid_block.attentions.0", 1280),
}


# SDXL base: (first k, last k, diffusers attention block); 10 transformer blocks at level 2, 2 at level 1,
# so each attention spans several k (step 2)
SDXL_PROCESSOR_RANGES = [
    (1, 3, "down_blocks.1.attentions.0"), (5, 7, "down_blocks.1.attentions.1"),
    (9, 27, "down_blocks.2.attentions.0"), (29, 47, "down_blocks.2.attentions.1"),
    (49, 67, "up_blocks.0.attentions.0"), (69, 87, "up_blocks.0.attentions.1"), (89, 107, "up_blocks.0.attentions.2"),
    (109, 111, "up_blocks.1.attentions.0"), (113, 115, "up_blocks.1.attentions.1"), (117, 119, "up_blocks.1.attentions.2"),
    (121, 139, "mid_block.attentions.0"),
]


def block_table(unet: nn.Module) -> dict[int, str]:
    """k -> diffusers attention block name, from editlab's modules."""
    return {k: diffusers_block(layer.name) for k, layer in processor_table(unet).items()}


def check_sd15_table(unet: nn.Module) -> None:
    """For a UNet with SD 1.5's blocks, the k -> block table must be the published one."""
    ours = block_table(unet)
    published = {k: name for k, (name, _) in SD15_PROCESSOR_TABLE.items()}
    if sorted(ours.values()) == sorted(published.values()) and ours != published:
        raise AssertionError(f"processor index table differs from docs/checkpoints.md §9.1: {ours}")


def check_sdxl_table(unet: nn.Module) -> None:
    """For a UNet with SDXL base's 70 cross-attentions, the k -> block table must be the published one."""
    ours = block_table(unet)
    published = {k: name for first, last, name in SDXL_PROCESSOR_RANGES for k in range(first, last + 1, 2)}
    if len(ours) == len(published) == 70 and ours != published:
        raise AssertionError(f"processor index table differs from SDXL's published numbering: {ours}")


def read_ip_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, flat (``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight``, ...)."""
    checkpoint = read_checkpoint(path)  # safe: safetensors, or torch.load(weights_only=True)
    if not ({"image_proj", "ip_adapter"} & set(checkpoint.skipped)):
        return checkpoint.tensors
    # the .bin nests two dicts of tensors, which read_checkpoint skips; the same safe load, flattened
    nested = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    flat = dict(checkpoint.tensors)
    for group in ("image_proj", "ip_adapter"):
        for key, value in nested.get(group, {}).items():
            if not isinstance(value, torch.Tensor):
                raise WeightsError(f"{path}: {group}.{key} is a {type(value).__name__}, not a tensor")
            flat[f"{group}.{key}"] = value
    return flat


def convert_ip_adapter(tensors: dict[str, torch.Tensor]) -> Mapping:
    mapping = Mapping()
    for key, tensor in tensors.items():
        if key.startswith(("image_proj.", "ip_adapter.")):
            mapping.add(key, key, tensor)
        else:
            mapping.unknown(key)
    return mapping


def load_ip_adapter(path: str | Path, unet: nn.Module) -> tuple[IPAdapter, ConversionReport]:
    """An IP-Adapter file for ``unet`` -> (adapter on the UNet's device, report). Strict: every key used,
    every parameter filled with the right shape."""
    tensors = read_ip_adapter(path)
    proj, norm = tensors.get("image_proj.proj.weight"), tensors.get("image_proj.norm.weight")
    if proj is None or norm is None:
        raise WeightsError(f"{path}: not an IP-Adapter file (no image_proj.proj.weight / image_proj.norm.weight); "
                           "Plus/FaceID adapters (patch tokens) are not supported")
    token_dim = norm.shape[0]
    context = next(iter(processor_table(unet).values())).to_k.in_features
    if token_dim != context:  # e.g. an SD 1.5 adapter (768) on SDXL (2048): every to_k_ip would mismatch
        raise WeightsError(f"{path}: an IP-Adapter for a UNet whose text context is {token_dim} wide (SD 1.5: 768, "
                           f"SDXL: 2048), but this model's is {context}; use the adapter made for this model "
                           "(ip-adapter_sdxl* for SDXL, ip-adapter_sd15* for SD 1.5)")
    check_sd15_table(unet)
    check_sdxl_table(unet)
    with torch.device("meta"):
        target = IPAdapter(unet, embed_dim=proj.shape[1], token_dim=token_dim, n_tokens=proj.shape[0] // token_dim)
    state, report = assemble(convert_ip_adapter(tensors), target, source=str(path), info={"layout": "ip-adapter"})
    target.load_state_dict(state, strict=True, assign=True)
    weight = next(unet.parameters())
    return target.to(weight.device, weight.dtype).eval(), report
