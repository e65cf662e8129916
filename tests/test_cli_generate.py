"""editlab generate / sdedit from the command line: reproducible PNGs that record their parameters, no silent
overwrites, one-line errors."""

import json

import pytest
import torch

from editing.cli import main
from ldm.images import file_sha256, read_parameters


def _generate(weights, out, *extra):
    return main(["generate", "--weights", str(weights), "--prompt", "a red circle", "--steps", "4",
                 "--height", "16", "--width", "24", "--out", str(out), *extra])


def test_same_command_gives_byte_identical_png_with_parameters(weights, tmp_path):
    assert _generate(weights, tmp_path / "a.png", "--seed", "5") == 0
    assert _generate(weights, tmp_path / "b.png", "--seed", "5") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    params = read_parameters(tmp_path / "a.png")
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["steps"] == 4
    assert params["scheduler"] == "ddim" and params["guidance"] == 7.5
    assert params["weights_sha256"] == file_sha256(weights)
    # the same run again may replace its own file; it is still byte-identical
    assert _generate(weights, tmp_path / "a.png", "--seed", "5") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_another_runs_file_is_not_overwritten_without_force(weights, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert _generate(weights, out, "--seed", "1") == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert _generate(weights, out, "--seed", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and "Traceback" not in err[0]
    assert out.read_bytes() == before
    assert _generate(weights, out, "--seed", "2", "--force") == 0
    assert read_parameters(out)["seed"] == 2


def test_batch_writes_numbered_files(weights, tmp_path):
    assert _generate(weights, tmp_path / "x.png", "--batch", "2") == 0
    first, second = (read_parameters(tmp_path / f"x-{k}.png") for k in (0, 1))
    assert (first["batch_index"], second["batch_index"]) == (0, 1)


@pytest.mark.parametrize("args,message", [
    (["--height", "21"], "not a multiple of 2"),
    (["--weights", "missing.safetensors"], "not found"),
])
def test_bad_input_is_a_one_line_error(weights, tmp_path, capsys, args, message):
    capsys.readouterr()
    code = _generate(weights, tmp_path / "bad.png", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_sdedit_command(weights, tmp_path):
    from ldm.images import save_png

    source = tmp_path / "in.png"
    save_png(source, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), {"what": "input"})
    out = tmp_path / "edit.png"
    assert main(["sdedit", "--weights", str(weights), "--image", str(source), "--prompt", "a blue square",
                 "--strength", "0.5", "--steps", "4", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["strength"] == 0.5 and params["image_sha256"] == file_sha256(source)
    assert json.dumps(params)  # serialisable
