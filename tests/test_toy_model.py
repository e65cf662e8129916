"""The shipped toy model (ldm/toy/weights/toy-sd.safetensors, made by `editlab train-toy`): its file, its VAE
and whether its images follow their captions, as read by ldm.toy.readers."""

import json

import numpy as np
import pytest
import torch

from editing.options import TOY_WEIGHTS
from ldm.config import toy
from ldm.model import StableDiffusion, metadata_of
from ldm.pipeline import SamplingConfig, decode_latents, text_to_image
from ldm.toy import ShapesDataset, caption, mask_iou, object_mask, read_colour, read_shape, render, spec_from_caption

pytestmark = pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason="toy weights not built (editlab train-toy)")


@pytest.fixture(scope="module")
def model():
    return StableDiffusion.load(TOY_WEIGHTS)


def to_numpy(images: torch.Tensor) -> list[np.ndarray]:
    return [image.permute(1, 2, 0).numpy() for image in images]  # [3, H, W] in [0, 1] -> [H, W, 3]


@torch.no_grad()
def round_trip(model, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> VAE mode -> decoded, in [0, 1]."""
    z = model.vae.encode(images * 2 - 1).mode()
    return (model.vae.decode(z) / 2 + 0.5).clamp(0, 1)


def test_file_is_small_and_describes_its_training(model):
    assert TOY_WEIGHTS.stat().st_size <= 25 * 2**20
    info = metadata_of(TOY_WEIGHTS)
    settings = json.loads(info["recipe_settings"])
    assert info["recipe"].startswith("editlab-toy") and int(info["steps"]) == settings["steps"] > 0
    assert float(info["scaling_factor"]) == model.config.vae.scaling_factor != 1.0  # measured, not the default
    expected = toy()  # the preset, except the measured scaling factor
    assert model.config.unet == expected.unet and model.config.text == expected.text
    assert model.config.vae.block_channels == expected.vae.block_channels and model.config.family == "toy"
    assert model.config.vae.downsample_factor == 4  # 64×64 images, 16×16×4 latents


def test_vae_keeps_toy_objects(model):
    specs = [ShapesDataset(16, seed=77).spec(i) for i in range(16)]
    rendered = [render(spec) for spec in specs]
    images = torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image, _ in rendered])
    decoded = to_numpy(round_trip(model, images))
    assert min(mask_iou(object_mask(d), mask) for d, (_, mask) in zip(decoded, rendered)) > 0.8
    assert [read_colour(d) for d in decoded] == [spec.colour for spec in specs]
    shapes_kept = np.mean([read_shape(d) == spec.shape for d, spec in zip(decoded, specs)])
    assert shapes_kept >= 0.8, shapes_kept  # measured 16/16 (14/16 when objects were 0.28-0.44 wide)


def test_vae_round_trips_a_photograph_without_shift(model):
    data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    photo = torch.from_numpy(resize(data.astronaut(), (64, 64), anti_aliasing=True)).permute(2, 0, 1).float()
    decoded = round_trip(model, photo[None])[0]
    errors = {(dy, dx): ((decoded.roll((dy, dx), dims=(1, 2)) - photo)[:, 4:-4, 4:-4] ** 2).mean().item()
              for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)}
    assert min(errors, key=errors.get) == (0, 0)  # no spatial shift (the VAE padding bug shifts by pixels)
    border = (decoded - photo)[:, [0, -1], :].abs().mean() + (decoded - photo)[:, :, [0, -1]].abs().mean()
    assert border.item() / 2 < 2 * (decoded - photo).abs().mean().item()  # no dark frame
    psnr = 10 * torch.log10(1 / ((decoded - photo) ** 2).mean()).item()
    assert psnr > 17, psnr  # measured 18.5 dB (a 64×64 photograph is dense detail for a 0.7M-parameter VAE)


@pytest.fixture(scope="module")
def caption_accuracy(model) -> dict[str, float]:
    """64 captions from the data distribution (not the training images), DDIM 20 steps, guidance 5, read back."""
    data = ShapesDataset(64, seed=2024)
    specs = [data.spec(i) for i in range(64)]
    cfg = SamplingConfig(steps=20, guidance=5.0, seed=0, height=64, width=64)
    images = to_numpy(decode_latents(model, text_to_image(model, [caption(s) for s in specs], cfg, progress=False)))
    return {"colour": np.mean([read_colour(image) == spec.colour for image, spec in zip(images, specs)]),
            "shape": np.mean([read_shape(image) == spec.shape for image, spec in zip(images, specs)])}


def test_generated_objects_have_the_caption_colour(caption_accuracy):
    assert caption_accuracy["colour"] >= 0.9, caption_accuracy


def test_generated_objects_have_the_caption_shape(caption_accuracy):
    assert caption_accuracy["shape"] >= 0.8, caption_accuracy


@pytest.fixture(scope="module")
def word_swaps(model) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Same seed, one word changed: (what the caption asks, what the readers see)."""
    prompts = [f"a {c} {s} on a white background" for s in ("circle", "square") for c in ("red", "blue")]
    cfg = SamplingConfig(steps=20, guidance=5.0, seed=3, height=64, width=64)
    images = to_numpy(decode_latents(model, text_to_image(model, prompts * 2, cfg, progress=False)))
    wanted = [(spec.colour, spec.shape) for spec in map(spec_from_caption, prompts * 2)]
    return [(w, (read_colour(image), read_shape(image))) for w, image in zip(wanted, images)]


def test_colour_word_steers_the_object(word_swaps):
    assert np.mean([want[0] == read[0] for want, read in word_swaps]) >= 0.75, word_swaps


def test_shape_word_steers_the_object(word_swaps):
    assert np.mean([want[1] == read[1] for want, read in word_swaps]) >= 0.75, word_swaps
