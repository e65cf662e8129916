"""editlab p2p from the command line, on a tiny random model."""

import re

import pytest
import torch
from PIL import Image

from editing.cli import main
from editing.p2p.visualize import LABEL_HEIGHT
from ldm.images import file_sha256, read_parameters

FILES = ["source.png", "edited.png", "attention-source.png", "attention-edited.png"]


def p2p(weights, out, *extra):
    return main(["p2p", "--weights", str(weights), "--prompt", "a cat on a mat", "--steps", "2",
                 "--height", "32", "--width", "32", "--out", str(out), *extra])


def test_writes_images_and_attention_grids_with_parameters(weights, tmp_path, capsys):
    extra = ["--edit", "a hippopotamus on a mat", "--blend", "cat", "hippopotamus", "--reweight", "hippopotamus=-1",
             "--cross-replace", "0.8", "mat=0.5", "--self-replace", "0", "0.5", "--tile", "32"]
    assert p2p(weights, tmp_path, *extra) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    params = read_parameters(tmp_path / "edited.png")
    assert params["edits"] == ["a hippopotamus on a mat"] and params["mode"] == "swap" and params["row"] == 1
    assert params["reweight"] == {"hippopotamus": -1.0} and params["cross_replace_words"] == {"mat": 0.5}
    assert params["blend"] == ["cat", "hippopotamus"] and params["self_replace"] == [0.0, 0.5]
    assert params["map_level"] == 1 and params["self_level"] == 1 and params["steps"] == 2
    assert params["weights_sha256"] == file_sha256(weights) and params["guidance"] == 7.5
    assert Image.open(tmp_path / "source.png").size == (32, 32)
    assert Image.open(tmp_path / "attention-source.png").size == (7 * 32, 32 + LABEL_HEIGHT)  # 7 tokens
    assert Image.open(tmp_path / "attention-edited.png").size == (8 * 32, 2 * (32 + LABEL_HEIGHT))  # 9 tokens
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    assert p2p(weights, tmp_path, *extra) == 0  # the same run again: same bytes
    assert before == {name: (tmp_path / name).read_bytes() for name in FILES}
    capsys.readouterr()
    assert p2p(weights, tmp_path, *extra, "--seed", "9") == 2  # another run's files: refused before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert before == {name: (tmp_path / name).read_bytes() for name in FILES}


def test_real_image_with_null_text_inversion(weights, tmp_path):
    picture = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(picture.numpy()).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert p2p(weights, out, "--edit", "a cat on a red mat", "--mode", "refine", "--image", str(tmp_path / "in.png"),
               "--height", "16", "--width", "16") == 0
    params = read_parameters(out / "source.png")
    assert params["inversion"] == "null-text" and params["image_sha256"] == file_sha256(tmp_path / "in.png")
    assert params["blend_start"] == 0.2 and params["self_replace"] == [0.0, 0.5] and params["self_level"] == 0
    assert Image.open(out / "edited.png").size == (16, 16)


@pytest.mark.parametrize("extra, message", [
    (["--edit", "a dog on a mat", "--blend", "zebra"], "blend word 'zebra'"),
    (["--edit", "a dog on a mat", "--reweight", "dog"], "expected WORD=NUMBER"),
    (["--edit", "a big dog on a mat"], r"only in the edit: \['big', 'dog'\]"),
    (["--edit", "a dog on a mat", "--cross-replace", "0.8", "0.4"], "one default fraction"),
    (["--edit", "a dog on a mat", "--image", "missing.png"], "no such image file"),
])
def test_bad_input_is_a_one_line_error(weights, tmp_path, capsys, extra, message):
    assert p2p(weights, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert re.search(message, err[0]), err[0]
    assert not any(tmp_path.iterdir())


def test_real_images_need_deterministic_ddim(weights, tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    assert p2p(weights, tmp_path / "out", "--edit", "a dog on a mat", "--image", str(tmp_path / "in.png"),
               "--scheduler", "euler-a") == 2
    assert "scheduler 'ddim' with eta 0" in capsys.readouterr().err

