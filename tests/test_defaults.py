"""Defaults live in one place, the methods' configs: the Python API called with its defaults and the command with
no options give byte-identical images, on the bundled toy models (the commands' default weights): Prompt-to-Prompt
on a real image (null-text inversion), edit-friendly DDPM editing, and InstructPix2Pix."""

import numpy as np
import pytest
import torch
from PIL import Image

from editing.cli import main
from editing.ddpm_edit.editor import invert_and_edit
from editing.instruct_pix2pix.editor import edit_by_instruction
from editing.options import TOY_IP2P_WEIGHTS, TOY_WEIGHTS
from editing.p2p.edit import edit_real_image
from ldm.images import load_image, to_pil
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.toy.shapes import render, spec_from_caption

SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A rendered toy image (64², the toy models' native size), as a PNG."""
    path = tmp_path_factory.mktemp("defaults") / "input.png"
    array, _ = render(spec_from_caption(SOURCE, center=(0.45, 0.5), size=0.45), resolution=64)
    Image.fromarray(array).save(path)
    return path


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def api_png(model, latents, row: int = 0) -> np.ndarray:
    return np.asarray(to_pil(decode_latents(model, latents)[row]))  # the rounding save_png applies


def test_p2p_real_image(picture, tmp_path):
    model = StableDiffusion.load(TOY_WEIGHTS)
    result, _ = edit_real_image(model, load_image(picture), SOURCE, TARGET)
    assert main(["p2p", "--image", str(picture), "--prompt", SOURCE, "--edit", TARGET, "--out", str(tmp_path)]) == 0
    assert np.array_equal(png(tmp_path / "source.png"), api_png(model, result.latents, 0))
    assert np.array_equal(png(tmp_path / "edited.png"), api_png(model, result.latents, 1))


def test_ddpm_edit(picture, tmp_path):
    model = StableDiffusion.load(TOY_WEIGHTS)
    latents, _ = invert_and_edit(model, load_image(picture), SOURCE, TARGET)
    assert main(["ddpm-edit", "--image", str(picture), "--source-prompt", SOURCE, "--target-prompt", TARGET,
                 "--out", str(tmp_path)]) == 0
    assert np.array_equal(png(tmp_path / "edit-0.png"), api_png(model, latents))


def test_instruct_pix2pix(picture, tmp_path):
    model = StableDiffusion.load(TOY_IP2P_WEIGHTS)
    instruction = "make the circle green"
    latents = edit_by_instruction(model, load_image(picture), [instruction], progress=False)
    assert main(["ip2p", "--image", str(picture), "--instruction", instruction, "--out", str(tmp_path / "e.png")]) == 0
    assert np.array_equal(png(tmp_path / "e.png"), api_png(model, latents))


def test_the_comparison_sees_a_changed_default(picture, tmp_path):
    """One option away from the defaults gives another image, so the equalities above are not vacuous."""
    model = StableDiffusion.load(TOY_IP2P_WEIGHTS)
    latents = edit_by_instruction(model, load_image(picture), ["make the circle green"], progress=False)
    assert main(["ip2p", "--image", str(picture), "--instruction", "make the circle green", "--seed", "1",
                 "--steps", "20", "--out", str(tmp_path / "e.png")]) == 0
    assert not np.array_equal(png(tmp_path / "e.png"), api_png(model, latents))
    assert torch.is_tensor(latents) and latents.shape == (1, 4, 16, 16)
