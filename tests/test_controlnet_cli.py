"""editlab controlnet: strength 0 reproduces plain generation pixel for pixel, a real hint changes the image,
--detect canny works, several ControlNets and guess mode run, bad input gives one-line errors."""

import numpy as np
import pytest
from PIL import Image

from controls import ControlNet
from editing.cli import main
from ldm.config import tiny_sd1
from ldm.images import read_parameters
from ldm.model import StableDiffusion
from tests.peers import randomize_

SAMPLING = ["--steps", "3", "--guidance", "5", "--seed", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn")
    model = randomize_(StableDiffusion(tiny_sd1()), 0)
    model.save(folder / "sd.safetensors")
    randomize_(ControlNet.from_unet(model.unet, (16, 32)), 1).save(folder / "cn.safetensors")
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[4:12, 8] = 255
    Image.fromarray(edges).save(folder / "edges.png")
    photo = np.zeros((16, 16, 3), np.uint8)
    photo[4:12, 4:12] = (200, 30, 30)
    Image.fromarray(photo).save(folder / "photo.png")
    return folder


def _run(files, out, *extra):
    return main(["controlnet", "--weights", str(files / "sd.safetensors"), "--prompt", "a red square",
                 *SAMPLING, "--out", str(out), *extra])


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_zero_strength_is_plain_generation_and_a_hint_changes_the_image(files, tmp_path):
    assert main(["generate", "--weights", str(files / "sd.safetensors"), "--prompt", "a red square", *SAMPLING,
                 "--height", "16", "--width", "16", "--out", str(tmp_path / "plain.png")]) == 0
    cn = str(files / "cn.safetensors")
    assert _run(files, tmp_path / "zero.png", "--control", cn + ":0", "--hint", str(files / "edges.png")) == 0
    assert _run(files, tmp_path / "one.png", "--control", cn, "--hint", str(files / "edges.png")) == 0
    assert np.array_equal(_pixels(tmp_path / "plain.png"), _pixels(tmp_path / "zero.png"))
    assert np.abs(_pixels(tmp_path / "plain.png") - _pixels(tmp_path / "one.png")).max() > 10
    params = read_parameters(tmp_path / "one.png")
    assert params["controls"][0]["scale"] == 1.0 and len(params["hint_sha256"]) == 1


def test_detect_canny_two_controlnets_and_guess_mode(files, tmp_path):
    cn = str(files / "cn.safetensors")
    assert _run(files, tmp_path / "a.png", "--control", cn, "--control", cn + ":0.5", "--detect", "canny",
                "--image", str(files / "photo.png"), "--height", "16", "--width", "16", "--guess-mode") == 0
    params = read_parameters(tmp_path / "a.png")
    assert params["detect"] == "canny" and params["guess_mode"]
    assert [c["scale"] for c in params["controls"]] == [1.0, 0.5]
    assert _pixels(tmp_path / "a.png").shape == (16, 16, 3)


def test_bad_input_is_a_one_line_error(files, tmp_path, capsys):
    cn = str(files / "cn.safetensors")
    assert _run(files, tmp_path / "x.png", "--control", cn) == 2
    assert "--hint IMG" in capsys.readouterr().err
    assert _run(files, tmp_path / "x.png", "--control", cn, "--control", cn, "--hint", str(files / "edges.png"),
                "--hint", str(files / "edges.png"), "--hint", str(files / "edges.png")) == 2
    assert "3 --hint images for 2" in capsys.readouterr().err
    assert _run(files, tmp_path / "x.png", "--control", str(tmp_path / "none.safetensors"), "--hint",
                str(files / "edges.png")) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
