"""Architecture numbers read from tensor shapes, plus the family rules for what shapes cannot tell.

Everything structural is in the weights (already renamed to editlab's names): channels per level from the
first ResBlock's conv1, which levels have attention from which ``attentions`` exist, ResBlocks per level,
the cross-attention width from ``attn2.to_k``, conv vs linear projections from ``proj_in``'s rank, the VAE's
channels, the text encoder's width, depth, vocabulary and positions. So a tiny test model goes through
exactly the path a full one does.

Head counts are not in the weights (q, k, v are C×C whatever the split). They follow from the family
(docs/checkpoints.md §3, §7): SD 1 UNets have 8 heads, SD 2 UNets heads of size 64; CLIP-L has 12 heads and
OpenCLIP-H 16; SDXL's UNet has heads of 64, its bigG 20 heads, and its VAE scale is 0.13025. A preset (``like``) can stand in for the family rules: its head counts, GroupNorm groups, text
activation and padding are used, and everything else still comes from the shapes, so a preset follows what the
file shows (an 8-channel file gets an 8-channel UNet whatever the preset says). Any other model needs its
config passed explicitly (a config file: weights_convert/config_files.py).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.model import WeightsError

FAMILY_RULES = {  # family -> what the weights cannot say
    "sd1": dict(unet_heads=dict(n_heads=8, head_dim=None), text_heads=12, activation="quick_gelu", pad=49407),
    "ip2p": dict(unet_heads=dict(n_heads=8, head_dim=None), text_heads=12, activation="quick_gelu", pad=49407),
    "sd2": dict(unet_heads=dict(n_heads=None, head_dim=64), text_heads=16, activation="gelu", pad=0),
    # SDXL: CLIP-L as SD 1 (text_encoder), OpenCLIP-bigG (text_encoder_2: 20 heads, gelu, padded with 0)
    "sdxl": dict(unet_heads=dict(n_heads=None, head_dim=64), text_heads=12, activation="quick_gelu", pad=49407,
                 text_2=dict(text_heads=20, activation="gelu", pad=0), vae_scaling=0.13025),
    # SDXL refiner: bigG alone (text_encoder), five added numbers (sizes, crop, aesthetic score)
    "sdxl-refiner": dict(unet_heads=dict(n_heads=None, head_dim=64), text_heads=20, activation="gelu", pad=0,
                         vae_scaling=0.13025, added_numbers=5),
}


def _count(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in tensors if (m := re.match(pattern, k))})


def _need(tensors: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise WeightsError(f"cannot read the {what} architecture: no {key!r} in the weights")
    return tensors[key]


CONFIG_HINT = ("pass the model's config: --config FILE (its diffusers folder or config.json, an editlab config "
               "JSON, or the original LDM .yaml) or --config PRESET")


def unet_config(t: dict[str, torch.Tensor], family: str, like: UNetConfig | None = None,
                pooled_dim: int = 0) -> UNetConfig:
    """UNetConfig from editlab-named UNet tensors (no ``unet.`` prefix); ``like`` supplies what shapes cannot
    tell (heads, GroupNorm groups, fp32 attention) instead of the family rules. ``pooled_dim``: the width of
    SDXL's pooled text embedding, the rest of add_embedding's input being six sinusoids (the refiner: five)."""
    conv_in = _need(t, "conv_in.weight", "UNet")
    model_channels = conv_in.shape[0]
    levels = _count(t, r"down_blocks\.(\d+)\.")
    level_channels = [_need(t, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet").shape[0] for i in range(levels)]
    if any(ch % model_channels for ch in level_channels):
        raise WeightsError(f"UNet level channels {level_channels} are not multiples of {model_channels}")
    attn_key = next((k for k in t if k.endswith("attn2.to_k.weight")), None)
    depths = [_count(t, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    if depths and depths[-1] == 0:  # no attention at the last level (the refiner): the middle block's depth
        depths[-1] = _count(t, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    add = t.get("add_embedding.linear_1.weight")
    proj_key = next((k for k in t if k.endswith("proj_in.weight")), None)
    if attn_key is None or proj_key is None:
        raise WeightsError("the UNet has no cross-attention layers: not a Stable Diffusion UNet")
    rules = FAMILY_RULES[family]
    try:
        return UNetConfig(
            in_channels=conv_in.shape[1],
            out_channels=_need(t, "conv_out.weight", "UNet").shape[0],
            model_channels=model_channels,
            channel_mult=tuple(ch // model_channels for ch in level_channels),
            attention_levels=tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in t) for i in range(levels)),
            layers_per_level=_count(t, r"down_blocks\.0\.resnets\.(\d+)\."),
            context_dim=t[attn_key].shape[1],
            linear_projection=t[proj_key].ndim == 2,
            # editlab: SD 2.x attention scores and softmax always in fp32
            upcast_attention=like.upcast_attention if like else family == "sd2",
            time_embed_dim_mult=_need(t, "time_embedding.linear_1.weight", "UNet").shape[0] // model_channels,
            # SDXL: blocks per transformer (a level without attention takes 1, as in SDXL's own config)
            transformer_depth=None if max(depths) <= 1 else tuple(max(d, 1) for d in depths),
            addition_embed=None if add is None else "text_time",
            addition_time_embed_dim=256 if add is None else
            (add.shape[1] - pooled_dim) // FAMILY_RULES[family].get("added_numbers", 6),
            addition_in_dim=0 if add is None else add.shape[1],
            **(dict(n_heads=like.n_heads, head_dim=like.head_dim, norm_groups=like.norm_groups) if like
               else rules["unet_heads"]),
        )
    except AssertionError as err:
        rule = "the preset's heads and groups" if like else f"the {family} family rule for heads"
        raise WeightsError(f"the UNet does not fit {rule} ({err}); {CONFIG_HINT}") from None


def vae_config(t: dict[str, torch.Tensor], like: VAEConfig | None = None) -> VAEConfig:
    """VAEConfig from editlab-named VAE tensors (no ``vae.`` prefix); GroupNorm groups and the scaling factor
    from ``like`` when given (else Stable Diffusion's 32 and 0.18215)."""
    levels = _count(t, r"encoder\.down_blocks\.(\d+)\.")
    config = VAEConfig(
        in_channels=_need(t, "encoder.conv_in.weight", "VAE").shape[1],
        latent_channels=_need(t, "post_quant_conv.weight", "VAE").shape[0],
        block_channels=tuple(_need(t, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE").shape[0]
                             for i in range(levels)),
        layers_per_level=_count(t, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        **(dict(norm_groups=like.norm_groups, scaling_factor=like.scaling_factor) if like else {}),
    )
    odd = [ch for ch in config.block_channels if ch % config.norm_groups]
    if odd:  # GroupNorm would fail later with "num_channels must be divisible by num_groups"
        raise WeightsError(f"the VAE's channels {list(config.block_channels)} do not split into "
                           f"{config.norm_groups} GroupNorm groups, and its group count is not in the weights; "
                           f"{CONFIG_HINT}")
    return config


def text_config(t: dict[str, torch.Tensor], family: str, like: TextEncoderConfig | None = None,
                second: bool = False) -> TextEncoderConfig:
    """TextEncoderConfig from editlab-named text tensors (no ``text_encoder.`` prefix); heads, activation and
    padding from ``like`` when given, else from the family rules (``second``: SDXL's second encoder)."""
    token = _need(t, "text_model.embeddings.token_embedding.weight", "text encoder")
    rules = dict(FAMILY_RULES[family])
    if second:  # SDXL's text_encoder_2 (OpenCLIP-bigG)
        rules.update(FAMILY_RULES[family]["text_2"])
    if like is not None:
        rules.update(text_heads=like.n_heads, activation=like.activation, pad=like.pad_token_id)
    width, heads = token.shape[1], rules["text_heads"]
    if width % heads:
        raise WeightsError(f"text width {width} is not divisible by the text encoder's {heads} heads; {CONFIG_HINT}")
    projection = t.get("text_projection.weight")
    return TextEncoderConfig(
        vocab_size=token.shape[0],
        max_length=_need(t, "text_model.embeddings.position_embedding.weight", "text encoder").shape[0],
        width=width,
        n_layers=_count(t, r"text_model\.encoder\.layers\.(\d+)\."),
        n_heads=heads,
        mlp_dim=_need(t, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0],
        activation=rules["activation"],
        pad_token_id=rules["pad"],
        projection_dim=None if projection is None else projection.shape[0],
    )


def part_config(tensors: dict[str, torch.Tensor], part: str, family: str, like: ModelConfig | None = None):
    """The config of one part ("unet", "vae" or "text") from editlab-named tensors."""
    prefix = {"unet": "unet.", "vae": "vae.", "text": "text_encoder."}[part]
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if part == "unet":
        projection = tensors.get("text_encoder_2.text_projection.weight",  # SDXL's pooled embedding
                                 tensors.get("text_encoder.text_projection.weight"))  # (the refiner's)
        return unet_config(t, family, like and like.unet, 0 if projection is None else projection.shape[0])
    return vae_config(t, like and like.vae) if part == "vae" else text_config(t, family, like and like.text)


def model_config(tensors: dict[str, torch.Tensor], family: str, prediction_type: str,
                 like: ModelConfig | None = None) -> ModelConfig:
    """The whole ModelConfig from editlab-named tensors (``unet.*``, ``vae.*``, ``text_encoder.*``); ``like``
    (a preset) supplies what the shapes cannot tell, instead of the family rules."""
    parts = {}
    for part in ("unet", "vae", "text"):
        try:
            parts[part] = part_config(tensors, part, family, like)
        except WeightsError:
            if like is None:
                raise
            parts[part] = getattr(like, part)  # unreadable (keys of another family): the strict check will list them
    rules = FAMILY_RULES[family]
    if "text_2" in rules:  # SDXL: the second text encoder
        second = {k[len("text_encoder_2."):]: v for k, v in tensors.items() if k.startswith("text_encoder_2.")}
        parts["text_2"] = text_config(second, family, like and like.text_2, second=True)
    if "vae_scaling" in rules:  # SDXL: the VAE scale the weights do not hold
        parts["vae"] = dataclasses.replace(parts["vae"], scaling_factor=rules["vae_scaling"])
    return ModelConfig(**parts, prediction_type=prediction_type, family=family)
