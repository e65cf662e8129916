"""CLIP image encoder weights -> editlab's ``CLIPVisionModelWithProjection`` (docs/checkpoints.md §9.2).

transformers layout (IP-Adapter's ``models/image_encoder/``): the identity (``vision_model.…``,
``visual_projection.weight``); the ``position_ids`` buffer is ignored.

open_clip layout (``visual.…``, the prefix optional)::

    conv1.weight                               -> vision_model.embeddings.patch_embedding.weight
    class_embedding                            -> vision_model.embeddings.class_embedding
    positional_embedding (bare parameter)      -> vision_model.embeddings.position_embedding.weight
    ln_pre / ln_post                           -> vision_model.pre_layrnorm / post_layernorm
    transformer.resblocks.{n}.…                -> vision_model.encoder.layers.{n}.…  (in_proj split in thirds
                                                  q, k, v as the text tower, docs/checkpoints.md §7.2)
    proj [width, proj]                         -> visual_projection.weight [proj, width]  (transposed)

A whole open_clip model file also holds the text tower: its keys are ignored with a reason.
``load_text_with_projection`` reads that text tower (for InstantStyle's content prompt) with the §7.2 rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ldm.clip import CLIPTextModel
from ldm.clip_vision import CLIPVisionModelWithProjection, VisionConfig
from ldm.config import TextEncoderConfig
from ldm.model import WeightsError

from .files import read_checkpoint
from .ldm_text import POSITION_IDS_REASON, clip_key, convert_open_clip, open_clip_keys
from .report import ConversionReport, Mapping, assemble

OPEN_CLIP_FIXED = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, ViT-L, ViT-H, ViT-bigG (head sizes 64/64/80/104)


def is_open_clip(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k in tensors for k in ("visual.conv1.weight", "conv1.weight"))


def convert_open_clip_visual(tensors: dict[str, torch.Tensor]) -> Mapping:
    mapping = Mapping()
    prefix = "visual." if "visual.conv1.weight" in tensors else ""
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            mapping.ignore(key, "not part of the image tower (open_clip text tower or logit_scale)")
            continue
        path = key[len(prefix):]
        if path in OPEN_CLIP_FIXED:
            mapping.add(key, OPEN_CLIP_FIXED[path], tensor)
        elif path == "proj":
            mapping.add(key, "visual_projection.weight", tensor.t().contiguous())  # [width, proj] -> [proj, width]
        elif (converted := open_clip_keys(path, tensor)) is not None and path.startswith("transformer."):
            for target, value in converted:  # the text rules name text_model.…; the blocks are the same
                mapping.add(key, target.replace("text_model.", "vision_model."), value)
        else:
            mapping.unknown(key)
    return mapping


def convert_transformers_visual(tensors: dict[str, torch.Tensor]) -> Mapping:
    mapping = Mapping()
    for key, tensor in tensors.items():
        if key.endswith("position_ids"):
            mapping.ignore(key, POSITION_IDS_REASON)
        elif key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale"):
            mapping.ignore(key, "not part of the image tower (CLIPModel text tower)")
        elif key.startswith(("vision_model.", "visual_projection.")):
            mapping.add(key, key, tensor)
        else:
            mapping.unknown(key)
    return mapping


def vision_config(tensors: dict[str, torch.Tensor], n_heads: int | None = None) -> VisionConfig:
    """The architecture from editlab-named tensors (the head count is not in the weights: ``n_heads``, a
    config.json beside the file, or the usual count for the width)."""
    patch = tensors["vision_model.embeddings.patch_embedding.weight"]
    width, size = patch.shape[0], patch.shape[-1]
    positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = round((positions - 1) ** 0.5)
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    if n_heads is None and width not in HEADS_BY_WIDTH:
        raise WeightsError(f"image encoder of width {width}: cannot tell its head count; pass a config.json")
    return VisionConfig(image_size=side * size, patch_size=size, width=width, n_layers=len(layers),
                        n_heads=n_heads or HEADS_BY_WIDTH[width],
                        mlp_dim=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                        projection_dim=tensors["visual_projection.weight"].shape[0])


def load_image_encoder(path: str | Path, config: VisionConfig | None = None,
                       activation: str = "gelu") -> tuple[CLIPVisionModelWithProjection, ConversionReport]:
    """An image encoder file (or a transformers folder with config.json + weights) -> model, report."""
    path = Path(path)
    n_heads = None
    if path.is_dir():
        cfg_json = path / "config.json"
        files = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()]
        if not files:
            raise WeightsError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
        if cfg_json.is_file():
            raw = json.loads(cfg_json.read_text())
            n_heads = raw.get("num_attention_heads")
            activation = {"gelu": "gelu", "quick_gelu": "quick_gelu"}.get(raw.get("hidden_act", activation), activation)
        path = files[0]
    checkpoint = read_checkpoint(path)
    tensors = checkpoint.tensors
    if "open_clip_config" in checkpoint.metadata:  # a file that names its open_clip config (the toy CLIP)
        vision = json.loads(checkpoint.metadata["open_clip_config"])
        n_heads = vision["vision_cfg"]["width"] // vision["vision_cfg"].get("head_width", 64)
        activation = "quick_gelu" if vision.get("quick_gelu") else "gelu"
    mapping = convert_open_clip_visual(tensors) if is_open_clip(tensors) else convert_transformers_visual(tensors)
    if config is None:
        try:
            config = vision_config(mapping.tensors, n_heads)
        except KeyError as err:
            raise WeightsError(f"{path}: not a CLIP image encoder (no {err.args[0]})") from None
        config = VisionConfig(**{**config.__dict__, "activation": activation})
    with torch.device("meta"):
        target = CLIPVisionModelWithProjection(config)
    state, report = assemble(mapping, target, source=str(path),
                             info={"layout": "open_clip" if is_open_clip(tensors) else "transformers"})
    target.load_state_dict(state, strict=True, assign=True)  # the meta model takes the loaded tensors
    return target.eval(), report


def load_text_with_projection(path: str | Path) -> tuple[CLIPTextModel, ConversionReport]:
    """The full CLIP text tower with text_projection (InstantStyle's content embedding, docs/methods.md §9.1) from
    an open_clip file (``token_embedding.weight``, ..., ``text_projection``; a whole-model file's ``visual.*``
    is ignored) or a transformers CLIPTextModelWithProjection / CLIPModel file. Every block is kept (24 for
    OpenCLIP ViT-H/14, not SD 2's 23); heads = width / 64, GELU, as OpenCLIP."""
    tensors = read_checkpoint(path).tensors
    if "token_embedding.weight" in tensors:
        text = {k: v for k, v in tensors.items() if not k.startswith("visual.")}
        blocks = {int(m.group(1)) for k in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
        mapping = convert_open_clip(text, n_layers=len(blocks), projection=True, prefix="")
        for key in tensors.keys() - text.keys():
            mapping.ignore(key, "image tower of a whole open_clip model")
        layout = "open_clip"
    else:
        mapping = Mapping()
        for key, tensor in tensors.items():
            if key.startswith(("vision_model.", "visual_projection.")) or key == "logit_scale":
                mapping.ignore(key, "image tower of a whole CLIPModel")
            elif key.endswith("position_ids"):
                mapping.ignore(key, POSITION_IDS_REASON)
            else:
                mapping.add(key, clip_key(key), tensor)
        layout = "transformers"
    if not {"text_projection.weight", "text_model.embeddings.token_embedding.weight"} <= mapping.tensors.keys():
        raise WeightsError(f"{path}: not a CLIP text tower with text_projection (the content prompt needs the "
                           "projected text embedding of the image encoder's CLIP model)")
    t = mapping.tensors
    token = t["text_model.embeddings.token_embedding.weight"]
    cfg = TextEncoderConfig(
        vocab_size=token.shape[0], max_length=t["text_model.embeddings.position_embedding.weight"].shape[0],
        width=token.shape[1], n_heads=token.shape[1] // 64, activation="gelu", pad_token_id=0,
        n_layers=len({m.group(1) for k in t if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}),
        mlp_dim=t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=t["text_projection.weight"].shape[0])
    with torch.device("meta"):
        target = CLIPTextModel(cfg)
    state, report = assemble(mapping, target, source=str(path), info={"layout": layout})
    target.load_state_dict(state, strict=True, assign=True)
    return target.eval(), report
