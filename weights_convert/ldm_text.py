"""Text encoder names -> editlab's (= transformers' ``CLIPTextModel``) names (docs/checkpoints.md §7).

SD 1.x, ``cond_stage_model.transformer.``: OpenAI CLIP-L in transformers' layout already; the keys are kept
(``text_model.…``). transformers >= 5.6 saves ``CLIPTextModel`` without the ``text_model.`` level; such keys
get it back.

SD 2.x, ``cond_stage_model.model.``: open_clip's text tower::

    token_embedding.weight                     -> text_model.embeddings.token_embedding.weight
    positional_embedding  (bare parameter)     -> text_model.embeddings.position_embedding.weight
    transformer.resblocks.{n}.attn.in_proj_*   -> text_model.encoder.layers.{n}.self_attn.{q,k,v}_proj.*
                                                  (split in thirds along dim 0, in the order q, k, v)
    transformer.resblocks.{n}.attn.out_proj    -> ….self_attn.out_proj
    transformer.resblocks.{n}.ln_1 / ln_2      -> ….layer_norm1 / layer_norm2
    transformer.resblocks.{n}.mlp.c_fc / c_proj -> ….mlp.fc1 / mlp.fc2
    ln_final                                   -> text_model.final_layer_norm
    text_projection [width, proj]              -> text_projection.weight [proj, width]   (transposed: x @ P = Linear(Pᵀ))

SD 2 runs the tower up to its penultimate block; the last block, ``text_projection``, ``logit_scale`` and a
stored ``attn_mask`` are ignored unless the target model asks for them.

SDXL, ``conditioner.embedders.0.transformer.`` (CLIP-L, as SD 1.x) and ``conditioner.embedders.1.model.``
(OpenCLIP-bigG, the SD 2 rules above with every block and text_projection kept: the pooled embedding needs
the whole tower). The SDXL refiner has that bigG alone, at ``conditioner.embedders.0.model.``.
"""

from __future__ import annotations

import re

import torch

from .report import Mapping

CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP-L, transformers layout
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP-bigG, open_clip layout, all kept
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: the same bigG, alone

BLOCK_LEAVES = {  # open_clip ResidualAttentionBlock -> transformers CLIPEncoderLayer
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

POSITION_IDS_REASON = "position_ids buffer (recomputed; newer transformers drop it)"


def clip_key(path: str) -> str:
    """transformers CLIPTextModel key, with or without the ``text_model.`` level -> editlab key."""
    if path.startswith("text_model.") or path.startswith("text_projection."):
        return path
    return "text_model." + path


def convert_clip(source: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> Mapping:
    """SD 1.x text encoder: the identity, apart from the ``position_ids`` buffer (ignored)."""
    mapping = Mapping()
    for key in (k for k in source if k.startswith(prefix)):
        if key.endswith("embeddings.position_ids"):
            mapping.ignore(key, POSITION_IDS_REASON)
        else:
            mapping.add(key, clip_key(key[len(prefix):]), source[key])
    return mapping


def open_clip_keys(path: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """editlab key(s) and tensor(s) for one open_clip text key; None if no rule matches."""
    fixed = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    if path in fixed:
        return [(fixed[path], tensor)]
    if path == "text_projection":
        return [("text_projection.weight", tensor.t().contiguous())]  # [width, proj] -> [proj, width]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", path)
    if m is None:
        m_in = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", path)
        if m_in is None:
            return None
        layer = f"text_model.encoder.layers.{m_in.group(1)}.self_attn"
        q, k, v = (t.clone() for t in tensor.chunk(3, dim=0))  # [3C, ...] -> 3 × [C, ...], order q, k, v
        return [(f"{layer}.{name}_proj.{m_in.group(2)}", t) for name, t in zip("qkv", (q, k, v))]
    leaf = BLOCK_LEAVES.get(m.group(2))
    if leaf is None:
        return None
    return [(f"text_model.encoder.layers.{m.group(1)}.{leaf}.{m.group(3)}", tensor)]


def convert_open_clip(source: dict[str, torch.Tensor], n_layers: int, projection: bool,
                      prefix: str = OPEN_CLIP_PREFIX) -> Mapping:
    """SD 2.x text encoder. ``n_layers``: blocks the target runs; the file's last block is ignored when it is
    the one after those (the "penultimate" rule). ``projection``: whether the target has text_projection."""
    mapping = Mapping()
    keys = [k for k in source if k.startswith(prefix)]
    blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    last = max(blocks, default=-1)
    for key in keys:
        path = key[len(prefix):]
        block = re.match(r"transformer\.resblocks\.(\d+)\.", path)
        if block and int(block.group(1)) == last == n_layers:
            mapping.ignore(key, "OpenCLIP's last block: SD 2 uses the penultimate layer's output")
        elif path == "text_projection" and not projection:
            mapping.ignore(key, "CLIP's contrastive head (text_projection, logit_scale): unused by SD")
        elif path == "logit_scale":
            mapping.ignore(key, "CLIP's contrastive head (text_projection, logit_scale): unused by SD")
        elif path == "attn_mask":
            mapping.ignore(key, "causal mask buffer (recomputed)")
        elif (converted := open_clip_keys(path, source[key])) is None:
            mapping.unknown(key)
        else:
            for target, tensor in converted:
                mapping.add(key, target, tensor)
    return mapping
