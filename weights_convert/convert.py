"""Any Stable Diffusion checkpoint layout -> editlab's format: ``convert(src, dst, ...)``.

editlab's format is one safetensors file holding ``StableDiffusion``'s state dict and its ModelConfig
(ldm/model.py); ``StableDiffusion.load(dst)`` reads it back. The steps:

1. read the source safely and detect its layout and family (files.py, detect.py), unless forced;
2. rename every tensor by the layout's rules (ldm_checkpoint.py or diffusers_folder.py) into a Mapping;
3. work out the ModelConfig: from the shapes plus family rules (LDM), from config.json files (diffusers),
   from the file itself (editlab), or the one passed in: a ModelConfig, a config file (config_files.py: the
   parts it describes; the rest from the shapes), or a preset (what the shapes cannot tell);
4. optionally swap in a standalone VAE (its shapes must fit the model's VAE);
5. check strictly (report.py) and write atomically, with the source's name, sha256, layout and family.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.config import ModelConfig
from ldm.model import FORMAT, FORMAT_VERSION, StableDiffusion, WeightsError, write_weights
from ldm.schedulers import scheduler_config_json, source_scheduler_config, standard_scheduler_config
from ldm.vae import AutoencoderKL

from . import architecture
from .controlnet import convert_controlnet, is_controlnet
from .detect import LAYOUTS, detect_file_layout, detect_folder_layout, detect_ldm_family, vae_prefix
from .config_files import FileConfig, read_config
from .diffusers_folder import read_component, read_diffusers_folder, weight_files
from .files import Checkpoint, read_checkpoint, sha256_of
from .ldm_checkpoint import convert_ldm_checkpoint
from .ldm_unet import EMA_PREFIX, has_ema
from .ldm_vae import convert_vae
from .report import ConversionReport, Mapping, assemble

log = logging.getLogger(__name__)

PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class Converted:
    """A converted model in memory: what ``save`` writes and ``to_model`` builds."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # StableDiffusion state dict
    report: ConversionReport
    metadata: dict[str, str] = field(default_factory=dict)  # recorded in the output file


def convert(src: str | Path, dst: str | Path, *, layout: str | None = None, model: str | None = None,
            prediction: str | None = None, ema: bool | None = None, vae: str | Path | None = None,
            config: ModelConfig | str | Path | None = None, preset: ModelConfig | None = None,
            dtype: torch.dtype | None = None) -> ConversionReport:
    """Convert ``src`` (LDM single file, diffusers folder or editlab file) into editlab's format at ``dst``.

    :param layout: force "ldm", "diffusers" or "editlab" instead of detecting it
    :param model: force the family "sd1", "sd2", "ip2p" or "sdxl"
    :param prediction: "epsilon" or "v_prediction"; required for SD 2.x single files
    :param ema: use the UNet's EMA copy (True), the raw weights (False), or the default (None: EMA for IP2P)
    :param vae: a standalone VAE file or diffusers vae/ folder to use instead of the model's own VAE
    :param config: the ModelConfig to fill (needed for non-standard head counts, e.g. tiny test models), or a
        config file or folder to read it from (weights_convert/config_files.py)
    :param preset: a ModelConfig that supplies only what the shapes cannot tell (heads, groups, activation);
        the architecture follows the file (``editlab convert --config PRESET``)
    :param dtype: cast floating tensors (e.g. torch.float16); None keeps the source's dtypes
    :returns: the report (missing / unexpected / ignored / shape mismatches; the first two are empty)
    """
    dst = Path(dst)
    if dst.is_dir():
        raise WeightsError(f"{dst}: is a folder; give the output file name, e.g. {dst / 'model.safetensors'}")
    if layout is None and is_controlnet(src):  # original or diffusers ControlNet -> an editlab ControlNet file
        given = read_config(config) if isinstance(config, (str, Path)) else (config or preset)
        return convert_controlnet(src, dst, unet=given and given.unet, dtype=dtype)
    converted = load_converted(src, layout=layout, model=model, prediction=prediction, ema=ema, vae=vae, config=config,
                               preset=preset)
    save(converted, dst, dtype)
    return converted.report


def load_converted(src: str | Path, *, layout: str | None = None, model: str | None = None,
                   prediction: str | None = None, ema: bool | None = None, vae: str | Path | None = None,
                   config: ModelConfig | str | Path | None = None, preset: ModelConfig | None = None) -> Converted:
    """Steps 1-5 of ``convert`` without writing: the converted tensors, config, report and metadata."""
    src = Path(src)
    given = read_config(config) if isinstance(config, (str, Path)) else None
    config = None if given is not None else config
    if layout is not None and layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if model is not None and model not in architecture.FAMILY_RULES:
        raise WeightsError(f"unknown model type {model!r}; choose sd1, sd2, ip2p or sdxl")
    if prediction is not None and prediction not in PREDICTIONS:
        raise WeightsError(f"unknown prediction type {prediction!r}; choose epsilon or v_prediction")
    if not src.exists():
        raise WeightsError(f"{src}: no such file or folder")
    checkpoint = None if src.is_dir() else read_checkpoint(src)
    if layout is None:
        layout = detect_folder_layout(src) if checkpoint is None else \
            detect_file_layout(src, list(checkpoint.tensors), checkpoint.metadata)
    if layout == "vae":
        raise WeightsError(f"{src}: is a standalone VAE, not a whole model; convert a full model and pass this "
                           "file with --vae")
    if (layout == "diffusers") != (checkpoint is None):
        raise WeightsError(f"{src}: layout {layout!r} needs a {'folder' if layout == 'diffusers' else 'file'}")

    info = {"layout": layout}
    if layout != "ldm" and config is None and given is None:
        config = preset  # configs of folders and editlab files are complete: a preset replaces them as a whole
    if layout == "ldm":
        mapping, config, files = _from_ldm(src, checkpoint.tensors, model, prediction, ema, config, info, given, preset)
        mapping.ignored.update(checkpoint.skipped)
    elif layout == "diffusers":
        mapping, config, files = _from_diffusers(src, model, prediction, config, given)
    else:
        mapping, config, files = _from_editlab(src, checkpoint, prediction, config, given)
    info.update(family=config.family, prediction=config.prediction_type)
    metadata = {"source": src.name, "source_sha256": sha256_of(files, src if src.is_dir() else None),
                "source_layout": layout, "source_family": config.family, "source_ema": info.get("ema", "absent")}
    if layout == "editlab":  # keep the provenance of the checkpoint the editlab file was converted from
        metadata.update({k: v for k, v in checkpoint.metadata.items() if k.startswith("source")})
    metadata["scheduler_config"] = scheduler_config_json(_scheduler_config(src, layout, checkpoint, config))
    if vae is not None:
        _swap_vae(mapping, Path(vae), config, info, metadata)

    try:
        with torch.device("meta"):
            target = StableDiffusion(config)
    except (AssertionError, ValueError, RuntimeError) as err:  # e.g. channels that no GroupNorm group count divides
        raise WeightsError(f"{src}: the model's config does not build ({err}); {architecture.CONFIG_HINT}") from None
    tensors, report = assemble(mapping, target, str(src), info)
    return Converted(config, tensors, report, metadata)


Parts = tuple[Mapping, ModelConfig, list[Path]]  # the renamed tensors, the config, the files read


def _from_ldm(src: Path, tensors: dict[str, torch.Tensor], model: str | None, prediction: str | None,
              ema: bool | None, config: ModelConfig | None, info: dict[str, str], given: FileConfig | None = None,
              preset: ModelConfig | None = None) -> Parts:
    family = model or detect_ldm_family(src, tensors)
    present = has_ema(tensors)
    if ema and not present:
        raise WeightsError(f"{src}: --ema asked for, but the file has no EMA copy of the UNet (model_ema.*)")
    use_ema = present and (family == "ip2p" if ema is None else ema)
    if present and not use_ema:
        log.info("%s also holds EMA weights; pass --ema to use them", src.name)
    info["ema"] = "used" if use_ema else ("not used" if present else "absent")
    text = config.text if config is not None else (given and given.text) or (preset and preset.text)
    mapping = convert_ldm_checkpoint(tensors, family, use_ema, text and text.n_layers, bool(text and text.projection_dim))
    prediction = _prediction(src, family, prediction, given and given.prediction_type, config or preset)
    try:
        if given is not None:  # the file's parts; the others from the shapes
            config = given.complete(lambda part: architecture.part_config(mapping.tensors, part, family))
        elif config is None:
            config = architecture.model_config(mapping.tensors, family, prediction, like=preset)
    except WeightsError as err:
        raise WeightsError(f"{src}: {err}") from None
    return mapping, config.replace(prediction_type=prediction, family=family), [src]


def _from_diffusers(src: Path, model: str | None, prediction: str | None, config: ModelConfig | None,
                    given: FileConfig | None = None) -> Parts:
    source = read_diffusers_folder(src, model)
    prediction = _prediction(src, source.family, prediction, (given and given.prediction_type) or source.prediction_type,
                             config)
    if given is not None:
        config = given.complete(lambda part: getattr(source, part))
    elif config is None:
        config = ModelConfig(unet=source.unet, vae=source.vae, text=source.text, text_2=source.text_2)
    return source.mapping, config.replace(prediction_type=prediction, family=source.family), source.files


def _from_editlab(src: Path, checkpoint: Checkpoint, prediction: str | None, config: ModelConfig | None,
                  given: FileConfig | None = None) -> Parts:
    if "config" not in checkpoint.metadata:
        raise WeightsError(f"{src}: not an editlab file (no config in its metadata); drop --layout editlab")
    own = ModelConfig.from_json(checkpoint.metadata["config"])
    config = given.complete(lambda part: getattr(own, part), own.prediction_type, own.family) if given is not None \
        else (config or own)
    mapping = Mapping()
    for key, tensor in checkpoint.tensors.items():
        mapping.add(key, key, tensor)
    return mapping, config.replace(prediction_type=prediction or config.prediction_type), [src]


def _scheduler_config(src: Path, layout: str, checkpoint: Checkpoint | None, config: ModelConfig) -> dict:
    """The schedule the samplers will use: a diffusers folder's scheduler/scheduler_config.json (the keys it
    sets), an editlab file's own, else the family's standard one; the prediction type is the converted one."""
    scheduler = src / "scheduler" / "scheduler_config.json"
    if layout == "diffusers" and scheduler.is_file():
        source = source_scheduler_config(json.loads(scheduler.read_text()))
    elif layout == "editlab" and "scheduler_config" in checkpoint.metadata:
        source = json.loads(checkpoint.metadata["scheduler_config"])
    else:
        source = standard_scheduler_config()
    return {**source, "prediction_type": config.prediction_type}


def _prediction(src: Path, family: str, user: str | None, from_source: str | None, config: ModelConfig | None) -> str:
    """The user's choice, else the source's scheduler config, else the passed ModelConfig, else the family
    default: epsilon for SD 1.x and IP2P; SD 2.x must be told (768-v models are v, 512-base epsilon)."""
    chosen = user or from_source or (config.prediction_type if config is not None else None)
    if chosen is None and family == "sd2":
        raise WeightsError(f"{src}: an SD 2.x model, whose prediction type is not stored in the weights; pass "
                           "--prediction v_prediction (768-v models) or --prediction epsilon (512-base models)")
    if chosen not in (None, *PREDICTIONS):
        raise WeightsError(f"{src}: unknown prediction type {chosen!r}; choose epsilon or v_prediction")
    return chosen or "epsilon"


def _swap_vae(mapping: Mapping, path: Path, config: ModelConfig, info: dict[str, str], metadata: dict[str, str]) -> None:
    """Replace the ``vae.*`` targets of ``mapping`` by the VAE in ``path`` (file or diffusers vae/ folder),
    which must fit the model's VAE config exactly."""
    if path.is_dir():
        if detect_folder_layout(path) != "vae":
            raise WeightsError(f"{path}: not a diffusers VAE folder (config.json of an AutoencoderKL)")
        tensors, prefix, files = read_component(path), f"{path.name}/", [path / "config.json", *weight_files(path)]
    else:
        checkpoint = read_checkpoint(path)
        found = detect_file_layout(path, list(checkpoint.tensors), checkpoint.metadata)
        if found != "vae":
            raise WeightsError(f"{path}: is a whole {found} model, not a standalone VAE file")
        tensors, prefix, files = checkpoint.tensors, vae_prefix(list(checkpoint.tensors)), [path]
    vae = convert_vae({k: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(EMA_PREFIX)}, prefix)
    for key in tensors:
        if key.startswith(EMA_PREFIX):
            vae.ignore(key, "EMA copy or bookkeeping in the VAE file")
        elif not key.startswith(prefix):
            vae.unknown(key)
    with torch.device("meta"):
        assemble(vae, AutoencoderKL(config.vae), str(path), {"layout": "vae", "family": config.family})
    mapping.drop_targets("vae.", f"VAE replaced by {path.name}")
    mapping.merge(vae, "vae.")
    info["vae"] = path.name
    metadata.update(vae_source=path.name, vae_source_sha256=sha256_of(files, path if path.is_dir() else None))


def to_model(converted: Converted) -> StableDiffusion:
    """A StableDiffusion module that uses the converted tensors directly (no copy)."""
    with torch.device("meta"):
        model = StableDiffusion(converted.config)
    model.load_state_dict(converted.tensors, strict=True, assign=True)
    return model.eval()


def save(converted: Converted, dst: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``converted`` atomically in editlab's format (what StableDiffusion.save writes), one tensor at a
    time: a memory-mapped source is read as it is written, and a cast copies one tensor at a time."""
    metadata = {"format_version": FORMAT_VERSION, **converted.metadata, "converter": "editlab weights_convert"}
    write_weights(dst, converted.tensors, FORMAT, converted.config.to_json(), metadata, dtype)
