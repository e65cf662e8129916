"""Model configs read from files, for single files that carry none (``editlab convert --config FILE``).

A single file's shapes say most of the architecture, but not its head counts, GroupNorm groups, text
activation, padding id or prediction type (docs/checkpoints.md §3, §15). ``read_config`` reads them from:

- editlab's own config JSON, as the weights metadata holds it (``ModelConfig.to_json``);
- a diffusers model folder (``model_index.json`` with unet/, vae/, text_encoder/, scheduler/ configs) or one
  component's ``config.json`` (UNet2DConditionModel, ControlNetModel, AutoencoderKL, CLIPTextModel) or a
  ``scheduler_config.json``;
- the original LDM YAML (v1-inference.yaml, v2-inference[-v].yaml, InstructPix2Pix's generate.yaml,
  ControlNet's cldm_v15.yaml). Only known fields are read; the ``target:`` class names are compared as text,
  never imported.

A file may describe part of a model (a UNet's config.json): the parts it leaves out are read from the
weights' shapes as without a config. ``FileConfig.complete`` joins the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.model import WeightsError

from .diffusers_folder import (pad_token_id, text_config_from_transformers, unet_config_from_diffusers,
                               vae_config_from_diffusers)
from .files import read_json

SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class FileConfig:
    """What a config file says; None where it says nothing."""

    source: str  # the file's name, for messages
    unet: UNetConfig | None = None
    vae: VAEConfig | None = None
    text: TextEncoderConfig | None = None
    prediction_type: str | None = None
    family: str | None = None

    def complete(self, from_shapes, prediction_type: str = "epsilon", family: str = "sd1") -> ModelConfig:
        """A whole ModelConfig: this file's parts, the others from ``from_shapes(part)`` ("unet", "vae", "text");
        the prediction type and family the file does not give from the arguments."""
        parts = {name: getattr(self, name) or from_shapes(name) for name in ("unet", "vae", "text")}
        return ModelConfig(**parts, prediction_type=self.prediction_type or prediction_type,
                           family=self.family or family)


def read_config(path: str | Path) -> FileConfig:
    """The config in ``path`` (module docstring); a one-line WeightsError naming the file when it is none."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _diffusers_pipeline(path)
        if (path / "config.json").is_file():
            return _json_config(path / "config.json")
        raise WeightsError(f"{path}: a folder without model_index.json or config.json; give a diffusers model "
                           "folder, a config.json, an editlab config JSON or an LDM .yaml")
    if not path.is_file():
        raise WeightsError(f"{path}: no such config file or folder")
    if path.suffix.lower() in (".yaml", ".yml"):
        return _ldm_yaml(path)
    if path.suffix.lower() == ".json":
        if path.name == "model_index.json":
            return _diffusers_pipeline(path.parent)
        return _json_config(path)
    raise WeightsError(f"{path}: not a config file (expected {', '.join(SUFFIXES)} or a diffusers folder)")


# ------------------------------------------------------------------------------------------------- JSON


def _json_config(path: Path) -> FileConfig:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a JSON object")
    if {"unet", "vae", "text"} <= raw.keys():  # editlab's ModelConfig JSON
        try:
            config = ModelConfig.from_json(json.dumps(raw))
        except (TypeError, KeyError, AssertionError) as err:
            raise WeightsError(f"{path}: not a valid editlab config ({err})") from None
        return FileConfig(path.name, config.unet, config.vae, config.text, config.prediction_type, config.family)
    kind = raw.get("_class_name") or raw.get("model_type")
    if kind == "ControlNetModel":
        from .controlnet import config_from_diffusers  # ControlNet's own reader (its extra fields)

        return FileConfig(path.name, unet=config_from_diffusers(raw, path).unet)
    if kind == "UNet2DConditionModel" or {"block_out_channels", "down_block_types", "cross_attention_dim"} <= raw.keys():
        unet = unet_config_from_diffusers(raw)
        family = "ip2p" if unet.in_channels == 8 else None
        return FileConfig(path.name, unet=unet, family=family)
    if kind == "AutoencoderKL" or {"latent_channels", "block_out_channels"} <= raw.keys():
        return FileConfig(path.name, vae=vae_config_from_diffusers(raw))
    if kind in ("CLIPTextModel", "CLIPTextModelWithProjection", "clip_text_model"):
        pad = 0 if raw.get("hidden_act") == "gelu" else 49407  # OpenCLIP-H pads with 0, CLIP-L with its end token
        return FileConfig(path.name, text=text_config_from_transformers(raw, pad, "WithProjection" in str(kind)))
    if "prediction_type" in raw or "beta_schedule" in raw:  # a scheduler_config.json
        return FileConfig(path.name, prediction_type=raw.get("prediction_type", "epsilon"))
    raise WeightsError(f"{path}: a JSON file that is neither an editlab config nor a diffusers config.json "
                       "(UNet, ControlNet, VAE, text encoder or scheduler)")


def _diffusers_pipeline(folder: Path) -> FileConfig:
    """The configs of a diffusers pipeline folder, without reading its weights."""
    from .detect import detect_diffusers_family

    index = read_json(folder / "model_index.json")
    refiner = index.get("text_encoder", [None])[0] is None and "text_encoder_2" in index  # SDXL refiner: bigG alone
    text_part = "text_encoder_2" if refiner else "text_encoder"
    parts = {}
    for part in ("unet", "vae", text_part):
        file = folder / part / "config.json"
        parts[part] = read_json(file) if file.is_file() else None
    if parts["unet"] is None:
        raise WeightsError(f"{folder}: no unet/config.json in this diffusers folder")
    family = "sdxl-refiner" if refiner else detect_diffusers_family(folder, parts["unet"], parts["text_encoder"] or {})
    text = None
    if parts[text_part] is not None:
        pad = pad_token_id(folder, "tokenizer_2" if refiner else "tokenizer")
        pad = {"sd2": 0, "sdxl-refiner": 0}.get(family, 49407) if pad is None else pad
        text = text_config_from_transformers(parts[text_part], pad,
                                             refiner or "WithProjection" in str(index.get("text_encoder")))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else None
    return FileConfig(folder.name, unet_config_from_diffusers(parts["unet"], upcast=family == "sd2"),
                      vae_config_from_diffusers(parts["vae"]) if parts["vae"] is not None else None,
                      text, prediction, family)


# ------------------------------------------------------------------------------------------------- YAML


def _ldm_yaml(path: Path) -> FileConfig:
    """The LDM training/inference YAML: model.params.{unet_config, first_stage_config, cond_stage_config}."""
    import yaml  # PyYAML's safe loader builds plain dicts and lists; no tag can construct an object

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not readable YAML ({err.__class__.__name__})") from None
    params = _get(raw, path, "model", "params")
    unet_params = _get(params, path, "unet_config", "params")
    text_family = _text_family(_get(params, path, "cond_stage_config"), path)
    family = "ip2p" if text_family == "sd1" and unet_params.get("in_channels") == 8 else text_family
    prediction = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    vae = None
    if isinstance(params.get("first_stage_config"), dict):
        vae = _vae_from_yaml(_get(params, path, "first_stage_config", "params"), params, path)
    # the text tower's shapes come from the weights, its heads, activation and padding from its family's rules
    return FileConfig(path.name, _unet_from_yaml(unet_params, sd2=family == "sd2", path=path), vae, None,
                      prediction, family)


def _get(node, path: Path, *keys):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise WeightsError(f"{path}: no {'.'.join(keys)} in this YAML; is it an LDM model config "
                               "(e.g. v1-inference.yaml)?")
        node = node[key]
    return node


def _unet_from_yaml(p: dict, sd2: bool, path: Path) -> UNetConfig:
    """LDM ``UNetModel`` params -> UNetConfig. ``attention_resolutions`` lists downsampling factors (1, 2, 4, …):
    level i (factor 2^i) has attention when its factor is listed."""
    if p.get("transformer_depth", 1) != 1 or p.get("use_spatial_transformer", True) is not True:
        raise WeightsError(f"{path}: transformer_depth {p.get('transformer_depth')} / no spatial transformer is not "
                           "a Stable Diffusion 1.x/2.x UNet")
    mult = tuple(p.get("channel_mult", (1, 2, 4, 4)))
    factors = set(p.get("attention_resolutions", (4, 2, 1)))
    heads, head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    per_head = dict(n_heads=None, head_dim=head_channels) if head_channels not in (None, -1) else \
        dict(n_heads=heads, head_dim=None)
    try:
        return UNetConfig(in_channels=p.get("in_channels", 4), out_channels=p.get("out_channels", 4),
                          model_channels=p.get("model_channels", 320), channel_mult=mult,
                          attention_levels=tuple(2 ** i in factors for i in range(len(mult))),
                          layers_per_level=p.get("num_res_blocks", 2), context_dim=p.get("context_dim", 768),
                          linear_projection=bool(p.get("use_linear_in_transformer", False)),
                          upcast_attention=sd2, **per_head)  # SD 2.x attends in fp32 (its ATTN_PRECISION default)
    except AssertionError as err:
        raise WeightsError(f"{path}: inconsistent unet_config ({err})") from None


def _vae_from_yaml(p: dict, model_params: dict, path: Path) -> VAEConfig:
    dd = _get(p, path, "ddconfig")
    if dd.get("attn_resolutions", []) or not dd.get("double_z", True):
        raise WeightsError(f"{path}: first_stage_config is not Stable Diffusion's KL autoencoder")
    ch = dd.get("ch", 128)
    return VAEConfig(in_channels=dd.get("in_channels", 3), latent_channels=p.get("embed_dim", dd.get("z_channels", 4)),
                     block_channels=tuple(ch * m for m in dd.get("ch_mult", (1, 2, 4, 4))),
                     layers_per_level=dd.get("num_res_blocks", 2),
                     scaling_factor=float(model_params.get("scale_factor", 0.18215)))


def _text_family(cond_stage: dict, path: Path) -> str:
    """"sd1" or "sd2" from the text tower that cond_stage_config.target names (compared as text, never imported)."""
    target = str(cond_stage.get("target", ""))
    name = target.rsplit(".", 1)[-1]
    if name == "FrozenCLIPEmbedder":
        return "sd1"  # OpenAI CLIP ViT-L/14, last layer
    if name == "FrozenOpenCLIPEmbedder":
        if (cond_stage.get("params") or {}).get("layer", "last") != "penultimate":
            raise WeightsError(f"{path}: an OpenCLIP text tower read at its last layer; editlab runs SD 2.x's "
                               "penultimate layer (layer: penultimate)")
        return "sd2"
    raise WeightsError(f"{path}: text encoder {target or '(none)'!r} is not CLIP ViT-L (FrozenCLIPEmbedder) or "
                       "OpenCLIP ViT-H (FrozenOpenCLIPEmbedder)")
