"""What a weights file or folder is: its layout and its model family (docs/checkpoints.md §3).

Layouts: ``ldm`` (one file, every component under its prefix), ``diffusers`` (a folder with
model_index.json), ``vae`` (a standalone VAE file or diffusers vae/ folder) and ``editlab`` (a file written by
``editlab convert``). Families: ``sd1``, ``sd2``, ``ip2p`` and ``sdxl``, read from sentinel keys and shapes:
the text encoder's layout (CLIP-L vs OpenCLIP-H; SDXL's ``conditioner.embedders.{0,1}`` pair of CLIP-L and
OpenCLIP-bigG) and conv_in's input channels (8 = InstructPix2Pix).
Files of other kinds (SDXL, ControlNet, LoRA, ...) are named in the error so the user knows what they have.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.model import FORMAT, WeightsError

from .ldm_text import CLIP_PREFIX, OPEN_CLIP_PREFIX, REFINER_OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX
from .ldm_unet import PREFIX as UNET_PREFIX
from .ldm_vae import PREFIXES as VAE_PREFIXES

LAYOUTS = ("ldm", "diffusers", "vae", "editlab")
FAMILIES = ("sd1", "sd2", "ip2p", "sdxl", "sdxl-refiner")

OTHER_MODELS = [  # (sentinel key prefix, what the file is): checked first, such files may also hold an SD UNet
    ("control_model.", "a ControlNet checkpoint; load it with the ControlNet loader, not 'convert'"),
]
OTHER_PARTS = [  # (sentinel key prefix, what the file is): checked when no layout matched
    ("controlnet_cond_embedding.", "a diffusers ControlNet; load it with the ControlNet loader, not 'convert'"),
    ("lora_", "a LoRA file, not a full model"),
    ("image_proj.", "an IP-Adapter file; load it with the IP-Adapter loader, not 'convert'"),
    ("string_to_param", "a textual-inversion embedding, not a full model"),
    ("down_blocks.", "a lone diffusers UNet weights file; convert the whole diffusers folder (the one with "
                     "model_index.json)"),
    ("text_model.", "a lone text encoder; convert the whole checkpoint or diffusers folder"),
]


def detect_folder_layout(path: Path) -> str:
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / "config.json").is_file() and "AutoencoderKL" in (path / "config.json").read_text():
        return "vae"
    raise WeightsError(f"{path}: a folder without model_index.json; pass the diffusers pipeline folder itself")


def vae_prefix(keys: list[str]) -> str | None:
    """The prefix under which a VAE sits ("" for standalone files), or None if there is no VAE."""
    for prefix in VAE_PREFIXES + ("",):
        if f"{prefix}encoder.conv_in.weight" in keys and f"{prefix}decoder.conv_in.weight" in keys:
            return prefix
    return None


def detect_file_layout(path: Path, keys: list[str], metadata: dict[str, str]) -> str:
    """Layout of a weights file from its keys (and metadata)."""
    if metadata.get("format") == FORMAT:
        return "editlab"
    for sentinel, what in OTHER_MODELS:
        if any(k.startswith(sentinel) for k in keys):
            raise WeightsError(f"{path}: this is {what}")
    if any(k.startswith("conditioner.embedders.") for k in keys) and not any(
            k.startswith((SDXL_OPEN_CLIP_PREFIX, REFINER_OPEN_CLIP_PREFIX)) for k in keys):
        raise WeightsError(f"{path}: this is an SD 3 or other conditioner-based checkpoint (conditioner.embedders.* "
                           "without SDXL's OpenCLIP-bigG), which editlab does not support")
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "ldm"
    if vae_prefix(keys) is not None:
        return "vae"
    for sentinel, what in OTHER_PARTS:
        if any(k.startswith(sentinel) for k in keys):
            raise WeightsError(f"{path}: this is {what}")
    shown = ", ".join(sorted(keys)[:3]) or "none"
    raise WeightsError(f"{path}: not a Stable Diffusion checkpoint: none of its {len(keys)} keys is a known "
                       f"layout (first keys: {shown}); expected model.diffusion_model.* (LDM) or a VAE")


def detect_ldm_family(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """sd1 / sd2 / ip2p / sdxl / sdxl-refiner of an LDM single file, from the text encoders' layout and
    conv_in's channels (the refiner's bigG sits at embedder 0, where the base model has CLIP-L)."""
    if any(k.startswith(REFINER_OPEN_CLIP_PREFIX) for k in tensors):
        return "sdxl-refiner"
    if any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in tensors):
        if not any(k.startswith(SDXL_CLIP_PREFIX) for k in tensors):
            raise WeightsError(f"{path}: an SDXL file without its CLIP-L text encoder ({SDXL_CLIP_PREFIX}*)")
        conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.shape[1] not in (4, 8):  # 8: the InstructPix2Pix SDXL UNet
            raise WeightsError(f"{path}: an SDXL UNet with {conv_in.shape[1]} input channels is not supported")
        return "sdxl"
    if any(k.startswith(CLIP_PREFIX) for k in tensors):
        text = "sd1"
    elif any(k.startswith(OPEN_CLIP_PREFIX) for k in tensors):
        text = "sd2"
    else:
        raise WeightsError(f"{path}: no text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*); "
                           "pass --model sd1|sd2|ip2p and --config if this is intended")
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return _family(path, text, 4 if conv_in is None else conv_in.shape[1])


def detect_diffusers_family(path: Path, unet: dict, text: dict) -> str:
    """sd1 / sd2 / ip2p / sdxl of a diffusers folder, from its configs (CLIP-L uses quick_gelu, OpenCLIP-H
    gelu; SDXL's UNet has the "text_time" added conditioning)."""
    if unet.get("addition_embed_type") == "text_time":
        if unet.get("in_channels", 4) not in (4, 8):  # 8: the InstructPix2Pix SDXL UNet
            raise WeightsError(f"{path}: an SDXL UNet with {unet.get('in_channels')} input channels is not supported")
        return "sdxl"
    return _family(path, "sd2" if text.get("hidden_act") == "gelu" else "sd1", unet.get("in_channels", 4))


def _family(path: Path, text_family: str, in_channels: int) -> str:
    if in_channels == 4:
        return text_family
    if in_channels == 8 and text_family == "sd1":
        return "ip2p"
    kind = "an inpainting model" if in_channels == 9 else f"a {in_channels}-channel UNet"
    raise WeightsError(f"{path}: {kind} with an {text_family} text encoder is not a supported model type; "
                       "pass --model sd1|sd2|ip2p to convert it anyway")
