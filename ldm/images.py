"""Reading input images and writing PNGs that record the parameters that made them.

Every PNG editlab writes carries a text chunk ``editlab`` holding the run's parameters as JSON (prompt, seed,
scheduler, steps, guidance, weights file hash, ...). Writes are atomic, and an existing file made by a
different run (or by anything else) is not overwritten unless the caller forces it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .files import atomic_path, file_sha256  # noqa: F401  (file_sha256: re-exported)

METADATA_KEY = "editlab"


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as an upright 8-bit RGB PIL image: the EXIF orientation of phone photos applied, and
    16-bit (or 32-bit integer / float) greyscale scaled to 8 bits instead of clipped to white."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I") or image.mode == "F":
                array = np.asarray(image, dtype=np.float64)
                if image.mode == "F":
                    scale = 1.0 if array.max() <= 1.0 else 255.0
                else:
                    scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
                array = np.clip(np.round(array / scale * 255.0), 0, 255).astype(np.uint8)
                image = Image.fromarray(array, mode="L")
            return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"{path}: not an image PIL can read ({err.__class__.__name__}); give a PNG or JPEG") from None


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file (``read_rgb``) -> [1, 3, H, W] float in [0, 1]. ``size`` = (width, height) resizes
    (Lanczos)."""
    image = read_rgb(path)
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # [H, W, 3] -> [1, 3, H, W]


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL image (rounded to 8 bits)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def read_parameters(path: str | Path) -> dict | None:
    """The parameters stored in an editlab PNG, or None for any other file."""
    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except Exception:
        return None
    return json.loads(text) if text else None


def check_output(path: str | Path, parameters: dict, force: bool = False) -> Path:
    """Refuse (before any work is done) to replace a PNG made by another run: an existing file may be replaced
    only if it records the same parameters (the same run again) or with ``force``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: output must be a .png file (it carries the run's parameters)")
    if path.exists() and not force and read_parameters(path) != json.loads(json.dumps(parameters)):
        raise FileExistsError(f"{path} exists and was made by another run; choose another --out or pass --force")
    return path


def save_png(path: str | Path, image: torch.Tensor, parameters: dict, force: bool = False) -> Path:
    """Write ``image`` [3, H, W] in [0, 1] with ``parameters`` in its metadata, atomically (see check_output)."""
    path = check_output(path, parameters, force)
    text = json.dumps(parameters, sort_keys=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, text)
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info)
    return path
