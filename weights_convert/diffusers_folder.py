"""A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...) -> editlab (docs/checkpoints.md §8).

editlab's parameter names are diffusers' and transformers' names, so the weights map by identity (old VAE
attention names and transformers >= 5.6's flattened CLIPTextModel keys aside). The work is in the configs:
each ``config.json`` is read field by field into editlab's dataclasses; a field that would change the
architecture away from Stable Diffusion's is refused by name rather than silently ignored.

diffusers' ``attention_head_dim`` is a head COUNT (huggingface/diffusers#2011), an int or one per level:
all equal -> ``n_heads``; channels / heads constant over the levels -> ``head_dim``; anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.config import TextEncoderConfig, UNetConfig, VAEConfig
from ldm.model import WeightsError

from .detect import detect_diffusers_family
from .files import read_checkpoint, read_json
from .ldm_text import POSITION_IDS_REASON, clip_key
from .ldm_vae import convert_vae
from .report import Mapping

UNET_FIXED = {  # fields that must keep Stable Diffusion's value (the diffusers default)
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
UNET_READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
             "use_linear_projection", "upcast_attention", "norm_num_groups",
             # SDXL
             "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim"}
UNET_INFO = {"sample_size", "dropout", "addition_embed_type_num_heads"}

VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
             "use_post_quant_conv": True, "mid_block_add_attention": True}
VAE_READ = {"in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "norm_num_groups", "scaling_factor", "down_block_types", "up_block_types", "force_upcast"}
VAE_INFO = {"sample_size"}

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def _check_fields(cfg: dict, fixed: dict, read: set, info: set, where: str) -> None:
    for name, value in cfg.items():
        if name.startswith("_") or name in read or name in info:
            continue
        if name not in fixed:
            raise WeightsError(f"{where}: unknown field {name!r} = {value!r}; editlab cannot tell what it changes")
        if value != fixed[name]:
            raise WeightsError(f"{where}: {name} = {value!r} is not a Stable Diffusion architecture "
                               f"(editlab supports {fixed[name]!r})")


def heads_from_diffusers(channels: list[int], heads: int | list[int]) -> dict:
    """diffusers head counts (int or per level) -> ``dict(n_heads=...)`` or ``dict(head_dim=...)``."""
    per_level = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(per_level) != len(channels):
        raise WeightsError(f"attention_head_dim {heads} has {len(per_level)} entries for {len(channels)} levels")
    if len(set(per_level)) == 1:
        return dict(n_heads=per_level[0], head_dim=None)
    sizes = {ch / h for ch, h in zip(channels, per_level)}
    if len(sizes) == 1 and float(next(iter(sizes))).is_integer():
        return dict(n_heads=None, head_dim=int(sizes.pop()))
    raise WeightsError(f"attention_head_dim {heads} (head counts) gives neither one head count nor one head size "
                       f"for channels {channels}; editlab supports only those two")


def unet_config_from_diffusers(cfg: dict, upcast: bool = False) -> UNetConfig:
    """UNetConfig from a diffusers ``unet/config.json`` dict. ``upcast`` forces fp32 attention (SD 2.x)."""
    _check_fields(cfg, UNET_FIXED, UNET_READ, UNET_INFO, "unet/config.json")
    channels = list(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
            [t == "CrossAttnUpBlock2D" for t in up[::-1]] != list(attention):
        raise WeightsError(f"unet/config.json: block types {down} / {up} are not a Stable Diffusion UNet")
    if any(ch % channels[0] for ch in channels):
        raise WeightsError(f"unet/config.json: block_out_channels {channels} are not multiples of {channels[0]}")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    if len(depth) != len(channels) or any(not isinstance(d, int) for d in depth):
        raise WeightsError(f"unet/config.json: transformer_layers_per_block {depth} is not one number per level")
    addition = cfg.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise WeightsError(f"unet/config.json: addition_embed_type {addition!r} is not supported (None or text_time)")
    try:
        return UNetConfig(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            model_channels=channels[0], channel_mult=tuple(ch // channels[0] for ch in channels),
            attention_levels=attention, layers_per_level=cfg.get("layers_per_block", 2),
            context_dim=cfg.get("cross_attention_dim", 1280), linear_projection=cfg.get("use_linear_projection", False),
            upcast_attention=bool(cfg.get("upcast_attention", False)) or upcast,
            norm_groups=cfg.get("norm_num_groups", 32), **heads_from_diffusers(channels, heads),
            transformer_depth=None if set(depth) == {1} else tuple(depth), addition_embed=addition,
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 256,
            addition_in_dim=(cfg.get("projection_class_embeddings_input_dim") or 0) if addition else 0)
    except AssertionError as err:
        raise WeightsError(f"unet/config.json: inconsistent UNet config ({err})") from None


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """VAEConfig from a diffusers ``vae/config.json`` dict."""
    _check_fields(cfg, VAE_FIXED, VAE_READ, VAE_INFO, "vae/config.json")
    levels = len(cfg["block_out_channels"])
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * levels))  # JSON lists or in-memory tuples
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * levels))
    if down != ["DownEncoderBlock2D"] * levels or up != ["UpDecoderBlock2D"] * levels or \
            cfg.get("out_channels", 3) != cfg.get("in_channels", 3):
        raise WeightsError("vae/config.json: block types or channels are not a Stable Diffusion KL autoencoder")
    return VAEConfig(in_channels=cfg.get("in_channels", 3), latent_channels=cfg.get("latent_channels", 4),
                     block_channels=tuple(cfg["block_out_channels"]), layers_per_level=cfg.get("layers_per_block", 2),
                     norm_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg.get("scaling_factor", 0.18215),
                     force_upcast=cfg.get("force_upcast", True))


def text_config_from_transformers(cfg: dict, pad_token_id: int, projection: bool = False) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers ``text_encoder/config.json`` (CLIPTextConfig) dict."""
    if cfg.get("model_type", "clip_text_model") != "clip_text_model" or cfg.get("layer_norm_eps", 1e-5) != 1e-5:
        raise WeightsError("text_encoder/config.json: not a CLIP text model with LayerNorm eps 1e-5")
    if cfg.get("hidden_act") not in ("quick_gelu", "gelu"):
        raise WeightsError(f"text_encoder/config.json: activation {cfg.get('hidden_act')!r} is not quick_gelu or gelu")
    return TextEncoderConfig(
        vocab_size=cfg["vocab_size"], max_length=cfg["max_position_embeddings"], width=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
        activation=cfg["hidden_act"], pad_token_id=pad_token_id,
        projection_dim=cfg.get("projection_dim") if projection else None)


def pad_token_id(folder: Path, name: str = "tokenizer") -> int | None:
    """The tokenizer's padding id from tokenizer/{special_tokens_map,tokenizer_config}.json and vocab.json."""
    tok = folder / name
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if pad is None and (tok / name).is_file():
            pad = read_json(tok / name).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad is None or not (tok / "vocab.json").is_file():
        return None
    vocab = read_json(tok / "vocab.json")
    if pad not in vocab:
        raise WeightsError(f"{tok}: pad token {pad!r} is not in vocab.json")
    return vocab[pad]


def weight_files(component: Path) -> list[Path]:
    """The weights of one component folder: full precision first, one file or the shards of an index."""
    for name in WEIGHT_NAMES:
        index = component / (name + ".index.json")
        if index.is_file():
            return sorted({component / shard for shard in read_json(index).get("weight_map", {}).values()})
        if (component / name).is_file():
            return [component / name]
    raise WeightsError(f"{component}: no weights file (looked for {', '.join(WEIGHT_NAMES[:4])}, ...)")


def read_component(component: Path) -> dict[str, torch.Tensor]:
    """All tensors of one component folder, keyed ``<folder name>/<key>`` (so reports name the folder)."""
    tensors = {}
    for file in weight_files(component):
        tensors.update({f"{component.name}/{k}": v for k, v in read_checkpoint(file).tensors.items()})
    return tensors


def convert_unet(tensors: dict[str, torch.Tensor], prefix: str = "") -> Mapping:
    """diffusers UNet2DConditionModel keys -> editlab: the identity."""
    mapping = Mapping()
    for key, tensor in tensors.items():
        mapping.add(key, key[len(prefix):], tensor)
    return mapping


def convert_text(tensors: dict[str, torch.Tensor], prefix: str = "") -> Mapping:
    """transformers CLIPTextModel keys (with or without ``text_model.``) -> editlab."""
    mapping = Mapping()
    for key, tensor in tensors.items():
        if key.endswith("embeddings.position_ids"):
            mapping.ignore(key, POSITION_IDS_REASON)
        else:
            mapping.add(key, clip_key(key[len(prefix):]), tensor)
    return mapping


@dataclass
class DiffusersSource:
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    text_2: TextEncoderConfig | None  # SDXL's text_encoder_2
    family: str
    prediction_type: str | None  # from scheduler/scheduler_config.json, None without one
    mapping: Mapping
    files: list[Path]  # what was read, for the source hash


def read_diffusers_folder(folder: Path, family: str | None = None) -> DiffusersSource:
    """Configs and weights of a diffusers SD pipeline folder. ``family`` (detected from the configs when
    None) decides the pad id when the folder has no tokenizer and turns fp32 attention on for SD 2."""
    index = read_json(folder / "model_index.json")
    refiner = index.get("text_encoder", [None])[0] is None and "text_encoder_2" in index  # bigG alone
    parts = ["unet", "vae"] + (["text_encoder_2"] if refiner else
                               ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in index else []))
    for part in parts:
        if part not in index or not (folder / part).is_dir():
            raise WeightsError(f"{folder}: no {part}/ component (model_index.json lists {sorted(index)})")
    configs = {part: read_json(folder / part / "config.json") for part in parts}
    family = family or ("sdxl-refiner" if refiner else
                        detect_diffusers_family(folder, configs["unet"], configs["text_encoder"]))
    if refiner != (family == "sdxl-refiner") or (
            not refiner and (family == "sdxl") != ("text_encoder_2" in configs)):
        raise WeightsError(f"{folder}: an SDXL folder needs text_encoder_2/ beside the SDXL UNet (the refiner: "
                           "text_encoder_2/ alone), and only SDXL has one; check model_index.json and --model")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else None
    mapping = Mapping()
    mapping.merge(convert_unet(read_component(folder / "unet"), "unet/"), "unet.")
    mapping.merge(convert_vae(read_component(folder / "vae"), "vae/"), "vae.")
    text_2 = None
    if refiner:  # the refiner's bigG is editlab's (only) text_encoder
        mapping.merge(convert_text(read_component(folder / "text_encoder_2"), "text_encoder_2/"), "text_encoder.")
        pad = pad_token_id(folder, "tokenizer_2")
        text = text_config_from_transformers(configs["text_encoder_2"], 0 if pad is None else pad, True)
    else:
        pad = pad_token_id(folder)
        pad = {"sd2": 0}.get(family, 49407) if pad is None else pad
        text = text_config_from_transformers(configs["text_encoder"], pad, "WithProjection" in str(index["text_encoder"]))
        mapping.merge(convert_text(read_component(folder / "text_encoder"), "text_encoder/"), "text_encoder.")
    if family == "sdxl":  # CLIPTextModelWithProjection: text_model.* and text_projection.weight
        mapping.merge(convert_text(read_component(folder / "text_encoder_2"), "text_encoder_2/"), "text_encoder_2.")
        pad_2 = pad_token_id(folder, "tokenizer_2")
        text_2 = text_config_from_transformers(configs["text_encoder_2"], 0 if pad_2 is None else pad_2, True)
    files = [folder / "model_index.json"] + [folder / p / "config.json" for p in configs]
    files += [f for p in configs for f in weight_files(folder / p)] + ([scheduler] if scheduler.is_file() else [])
    return DiffusersSource(
        unet=unet_config_from_diffusers(configs["unet"], upcast=family == "sd2"),
        vae=vae_config_from_diffusers(configs["vae"]),
        text=text, text_2=text_2,
        family=family, prediction_type=prediction, mapping=mapping, files=files)
