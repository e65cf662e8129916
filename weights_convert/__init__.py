"""Converters from the checkpoint layouts people have into editlab's own format (docs/checkpoints.md).

    convert(src, dst, layout=None, model=None, prediction=None, ema=None, vae=None, config=None) -> ConversionReport

reads an LDM single file (.ckpt / .safetensors: SD 1.x, SD 2.x, InstructPix2Pix, with or without EMA), a
diffusers folder, or an editlab file (to swap its VAE), and writes one editlab safetensors file that
``StableDiffusion.load`` reads back. The rules per component live in ldm_unet, ldm_vae, ldm_text and
diffusers_folder; each is a pure function from a dict of tensors to a Mapping, checked strictly by report.
"""

from .convert import Converted, convert, load_converted, save, to_model
from .detect import FAMILIES, LAYOUTS
from .files import read_checkpoint, sniff_format
from .report import ConversionReport, Mapping, assemble

__all__ = ["convert", "load_converted", "save", "to_model", "Converted", "ConversionReport", "Mapping", "assemble",
           "read_checkpoint", "sniff_format", "LAYOUTS", "FAMILIES"]
