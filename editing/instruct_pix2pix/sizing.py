"""Input sizing for InstructPix2Pix, as timothybrooks/instruct-pix2pix edit_cli.py does it (docs/methods.md §6.1).

With R the target resolution (512 for SD, the model's native size otherwise) and m the size multiple:

    k = R / max(W, H)                          scale the long side to R
    k = ⌈min(W, H)·k / m⌉·m / min(W, H)        then round the short side UP to a multiple of m
    W' = ⌊W·k / m⌋·m,  H' = ⌊H·k / m⌋·m        and floor both sides to multiples of m

then centre-crop to the aspect W':H' and resize with LANCZOS (PIL ``ImageOps.fit``). 1024×768 -> 512×384.

edit_cli.py uses m = 64 for SD: the VAE factor 8 times the UNet's 3 downsamplings (latents must halve 3 times).
editlab derives m from the model the same way (``size_multiple``): 64 for SD 1.x/2.x, 16 for the toy model.
editlab adds one check: a result whose long side exceeds 2R is refused (aspect ratios beyond 2R/m = 16 for SD,
where rounding a short side below m up to m blows the long side up: 2000×10 -> 12800×64 in edit_cli.py).
diffusers instead keeps the input size floored to a multiple of 8; reference tests feed both a pre-sized image
(docs/methods.md §6.3 item 4). ``keep_size`` keeps the input size, floored to multiples of m (centre crop).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config import ModelConfig
from ldm.images import read_rgb


def size_multiple(config: ModelConfig) -> int:
    """Image sides must be multiples of m = VAE factor × 2^(UNet downsamplings) (64 for SD)."""
    return config.vae.downsample_factor * 2 ** (len(config.unet.channel_mult) - 1)


def check_edit_size(width: int, height: int, config: ModelConfig) -> None:
    multiple = size_multiple(config)
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not a multiple of {multiple} (VAE factor × UNet "
                         f"downsamplings); size it with prepare_image or crop it to "
                         f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}")


def edit_size(width: int, height: int, resolution: int = 512, multiple: int = 64) -> tuple[int, int]:
    """(W', H') of edit_cli.py's rule (module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty; give a real image")
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is below the size multiple {multiple}; give at least {multiple}")
    short = min(width, height)
    factor = resolution / max(width, height)  # long side -> resolution
    factor = math.ceil(short * factor / multiple) * multiple / short  # short side rounded up to a multiple
    size = int(width * factor // multiple) * multiple, int(height * factor // multiple) * multiple
    if max(size) > 2 * resolution:  # only for aspect ratios beyond 2R/m: the short side rounded up from < m
        raise ValueError(f"image of {width}x{height} is too elongated for resolution {resolution} (it would become "
                         f"{size[0]}x{size[1]}); crop it first or pass --keep-size")
    return size


def kept_size(width: int, height: int, multiple: int = 64) -> tuple[int, int]:
    """The input size floored to multiples of ``multiple``."""
    if width < multiple or height < multiple:
        raise ValueError(f"image of {width}x{height} is smaller than {multiple} pixels on a side; this model needs "
                         f"sides of at least {multiple}: drop --keep-size or give a larger image")
    return width // multiple * multiple, height // multiple * multiple


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop to the aspect of ``size`` = (W, H), then LANCZOS resize (edit_cli.py's ImageOps.fit)."""
    if image.size == tuple(size):
        return image
    return ImageOps.fit(image, tuple(size), method=Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # [H, W, 3] -> [1, 3, H, W]


def open_rgb(path: str | Path) -> Image.Image:
    """The image file as upright 8-bit RGB (ldm.images.read_rgb: EXIF orientation, 16-bit scaled)."""
    return read_rgb(path)


def prepare_image(image: Image.Image, config: ModelConfig, resolution: int, keep_size: bool = False) -> torch.Tensor:
    """The edit's input image as [1, 3, H', W'] in [0, 1], sized by edit_cli.py's rule (or kept)."""
    multiple = size_multiple(config)
    width, height = image.size
    size = kept_size(width, height, multiple) if keep_size else edit_size(width, height, resolution, multiple)
    return to_tensor(fit(image, size))
