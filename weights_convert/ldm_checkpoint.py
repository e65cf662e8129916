"""An LDM single file (``.ckpt`` / ``.safetensors`` of SD 1.x, SD 2.x, InstructPix2Pix) -> editlab names.

docs/checkpoints.md §4: one prefix per component, each handed to its rules::

    model.diffusion_model.          -> unet.          (ldm_unet; or its EMA copy under model_ema.)
    first_stage_model.              -> vae.           (ldm_vae)
    cond_stage_model.transformer.   -> text_encoder.  (ldm_text, SD 1: CLIP-L, identity)
    cond_stage_model.model.         -> text_encoder.  (ldm_text, SD 2: OpenCLIP-H rules)
    conditioner.embedders.0.transformer. -> text_encoder.    (SDXL: CLIP-L, identity)
    conditioner.embedders.1.model.       -> text_encoder_2.  (SDXL: OpenCLIP-bigG rules, every block kept)
    conditioner.embedders.0.model.       -> text_encoder.    (SDXL refiner: the same bigG, alone)

and a documented ignore list: the training wrapper's schedule buffers, ``model_ema.*`` unless EMA is used
(``decay`` and ``num_updates`` always), and the SD 2 text extras handled in ldm_text. Anything else is
unexpected.
"""

from __future__ import annotations

import re

import torch

from .detect import vae_prefix
from .ldm_text import (OPEN_CLIP_PREFIX, REFINER_OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX,
                       convert_clip, convert_open_clip)
from .ldm_unet import EMA_PREFIX, convert_ldm_unet
from .ldm_vae import PREFIXES as VAE_PREFIXES
from .ldm_vae import convert_vae
from .report import Mapping

SCHEDULE_BUFFERS = {  # registered by LDM's DDPM wrapper; editlab computes its schedules itself
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
}
EMA_BOOKKEEPING = {EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}


def open_clip_blocks(tensors: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> int:
    """Number of OpenCLIP text blocks in the file (SD 2 runs all but the last; SDXL all)."""
    pattern = re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."
    return len({m.group(1) for k in tensors if (m := re.match(pattern, k))})


def convert_ldm_checkpoint(tensors: dict[str, torch.Tensor], family: str, use_ema: bool,
                           text_layers: int | None = None, text_projection: bool = False) -> Mapping:
    """Map an LDM single file's tensors to editlab's ``unet.*``, ``vae.*``, ``text_encoder.*`` names.

    :param family: "sd1", "sd2", "ip2p", "sdxl" or "sdxl-refiner": picks the text encoder rules
    :param use_ema: take the UNet from ``model_ema.*``
    :param text_layers: SD 2 text blocks the target runs (default: all but the file's last)
    :param text_projection: whether the target text encoder keeps OpenCLIP's text_projection
    """
    mapping = Mapping()
    mapping.merge(convert_ldm_unet(tensors, use_ema), "unet.")
    prefix = vae_prefix(list(tensors))
    if prefix in VAE_PREFIXES:
        mapping.merge(convert_vae(tensors, prefix), "vae.")
    if family == "sdxl":
        mapping.merge(convert_clip(tensors, SDXL_CLIP_PREFIX), "text_encoder.")
        blocks = open_clip_blocks(tensors, SDXL_OPEN_CLIP_PREFIX)
        mapping.merge(convert_open_clip(tensors, blocks, True, SDXL_OPEN_CLIP_PREFIX), "text_encoder_2.")
    elif family == "sdxl-refiner":
        blocks = open_clip_blocks(tensors, REFINER_OPEN_CLIP_PREFIX)
        mapping.merge(convert_open_clip(tensors, blocks, True, REFINER_OPEN_CLIP_PREFIX), "text_encoder.")
    elif family == "sd2":
        layers = open_clip_blocks(tensors) - 1 if text_layers is None else text_layers
        mapping.merge(convert_open_clip(tensors, layers, text_projection), "text_encoder.")
    else:
        mapping.merge(convert_clip(tensors), "text_encoder.")

    seen = set(mapping.sources.values()) | set(mapping.ignored) | set(mapping.unmatched) | set(mapping.duplicates)
    for key in tensors:
        if key in seen:
            continue
        if key in SCHEDULE_BUFFERS:
            mapping.ignore(key, "LDM training schedule buffer (editlab computes the schedule)")
        elif key in EMA_BOOKKEEPING:
            mapping.ignore(key, "EMA bookkeeping (decay, num_updates)")
        elif key.startswith(EMA_PREFIX) and not use_ema:
            mapping.ignore(key, "EMA copy of the UNet, not used (pass --ema to use it)")
        else:
            mapping.unknown(key)
    return mapping
