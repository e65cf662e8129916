"""A VAE round trip on real photographs keeps the image where it was: no shift, no border.

This catches the classic port bug of padding the VAE's stride-2 convolutions symmetrically instead of right and
bottom only (kjsman/stable-diffusion-pytorch#8: an 8-pixel shift and a brown border at 512 px; docs/checkpoints.md
§13). Random weights cannot reconstruct anything, so this uses the trained toy VAE (ldm/toy), which learned
natural-looking images as well as the toy shapes. Measured with the shipped weights, 128×128 photographs:
PSNR 19.6-22.5 dB and best shift (0, 0); with symmetric padding the best shift is (-2, -2) and PSNR drops by
about 5 dB.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from editing.options import TOY_WEIGHTS
from ldm.layers import Downsample
from ldm.model import StableDiffusion

skimage_data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason=f"toy weights {TOY_WEIGHTS} not built")
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea")


def _photograph(name: str, size: int = 128) -> torch.Tensor:
    image = Image.fromarray(getattr(skimage_data, name)()).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1  # [1, 3, H, W] in [-1, 1]


def _round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(x).mode())


def _best_shift(x: torch.Tensor, y: torch.Tensor, reach: int = 2) -> tuple[int, int]:
    """The (dy, dx) that best aligns y with x, by mean squared error away from the borders."""
    errors = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            moved = torch.roll(y, (dy, dx), dims=(2, 3))
            errors[(dy, dx)] = (x - moved)[..., 4:-4, 4:-4].pow(2).mean().item()
    return min(errors, key=errors.get)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return -10 * np.log10(((x - y) / 2).pow(2).mean().item())  # images in [-1, 1]: peak-to-peak 2


def _border_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean error in the outer 2-pixel frame over the mean error inside."""
    d = (x - y).abs().mean(dim=(0, 1))
    frame = torch.cat([d[:2].flatten(), d[-2:].flatten(), d[2:-2, :2].flatten(), d[2:-2, -2:].flatten()])
    return (frame.mean() / d[4:-4, 4:-4].mean()).item()


@pytest.fixture(scope="module")
def vae():
    return StableDiffusion.load(TOY_WEIGHTS).vae


@pytest.mark.parametrize("name", PHOTOGRAPHS)
def test_round_trip_keeps_the_photograph_in_place(vae, name):
    x = _photograph(name)
    y = _round_trip(vae, x)
    assert _best_shift(x, y) == (0, 0)
    assert _psnr(x, y) > 17.0
    assert _border_ratio(x, y) < 1.5  # no dark or bright frame


def test_symmetric_padding_would_be_caught(vae):
    x = _photograph("astronaut")
    good = _psnr(x, _round_trip(vae, x))
    vae = copy.deepcopy(vae)  # the fixture stays intact
    for module in vae.modules():  # the bug: pad 1 on every side instead of (0, 1, 0, 1)
        if isinstance(module, Downsample):
            module.asymmetric_pad, module.conv.padding = False, (1, 1)
    y = _round_trip(vae, x)
    assert _best_shift(x, y) != (0, 0)
    assert _psnr(x, y) < good - 3.0
