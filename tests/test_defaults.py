"""Defaults live in one place, the methods' configs: the Python API called with its defaults and the command with
no options give byte-identical images: Prompt-to-Prompt on a real image (null-text inversion: 50 steps of up to 10
optimiser steps each) and edit-friendly DDPM editing (100 steps) on a very small random model and a 16² image,
which keeps them fast; InstructPix2Pix on the bundled toy model (its command sizes the input to the model's native
size, 64² for the toy)."""

import numpy as np
import pytest
from PIL import Image

from editing.cli import main
from editing.ddpm_edit.editor import invert_and_edit
from editing.instruct_pix2pix.editor import edit_by_instruction
from editing.options import TOY_IP2P_WEIGHTS
from editing.p2p.edit import edit_real_image
from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.images import load_image, to_pil
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.toy.shapes import render, spec_from_caption
from tests.peers import randomize_

SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A rendered toy image (64², the toy models' native size), as a PNG."""
    path = tmp_path_factory.mktemp("defaults") / "input.png"
    array, _ = render(spec_from_caption(SOURCE, center=(0.45, 0.5), size=0.45), resolution=64)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random model smaller than tiny_sd1 (two levels, one ResBlock each, one text layer): the defaults run
    hundreds of UNet calls, and what is compared does not depend on the size."""
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2), attention_levels=(True, False), layers_per_level=1,
                      n_heads=2, context_dim=16, norm_groups=8)
    vae = VAEConfig(block_channels=(16, 32), layers_per_level=1, norm_groups=8)
    text = TextEncoderConfig(width=16, n_layers=1, n_heads=2, mlp_dim=32)
    path = tmp_path_factory.mktemp("defaults-model") / "small.safetensors"
    randomize_(StableDiffusion(ModelConfig(unet=unet, vae=vae, text=text)), seed=5).save(path)
    return path


@pytest.fixture(scope="module")
def small(picture):
    """The same picture at 16² (2² latents of the tiny model)."""
    path = picture.with_name("small.png")
    Image.open(picture).resize((16, 16), Image.LANCZOS).save(path)
    return path


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def api_png(model, latents, row: int = 0) -> np.ndarray:
    return np.asarray(to_pil(decode_latents(model, latents)[row]))  # the rounding save_png applies


def test_p2p_real_image(weights, small, tmp_path):
    model = StableDiffusion.load(weights)
    result, _ = edit_real_image(model, load_image(small), SOURCE, TARGET)
    assert main(["p2p", "--weights", str(weights), "--image", str(small), "--prompt", SOURCE, "--edit", TARGET,
                 "--out", str(tmp_path)]) == 0
    assert np.array_equal(png(tmp_path / "source.png"), api_png(model, result.latents, 0))
    assert np.array_equal(png(tmp_path / "edited.png"), api_png(model, result.latents, 1))


def ddpm_edit_cli(weights, small, out, *options):
    return main(["ddpm-edit", "--weights", str(weights), "--image", str(small), "--source-prompt", SOURCE,
                 "--target-prompt", TARGET, "--out", str(out), *options])


def test_ddpm_edit(weights, small, tmp_path):
    model = StableDiffusion.load(weights)
    latents, _ = invert_and_edit(model, load_image(small), SOURCE, TARGET)
    assert ddpm_edit_cli(weights, small, tmp_path) == 0
    assert np.array_equal(png(tmp_path / "edit-0.png"), api_png(model, latents))
    # one option away from the defaults gives another image, so the equalities here are not vacuous
    assert ddpm_edit_cli(weights, small, tmp_path / "other", "--skip", "20") == 0
    assert not np.array_equal(png(tmp_path / "other" / "edit-0.png"), api_png(model, latents))


def test_instruct_pix2pix(picture, tmp_path):
    model = StableDiffusion.load(TOY_IP2P_WEIGHTS)
    instruction = "make the circle green"
    latents = edit_by_instruction(model, load_image(picture), [instruction], progress=False)
    assert main(["ip2p", "--image", str(picture), "--instruction", instruction, "--out", str(tmp_path / "e.png")]) == 0
    assert np.array_equal(png(tmp_path / "e.png"), api_png(model, latents))
