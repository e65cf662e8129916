"""InstructPix2Pix input sizing (edit_cli.py's rule, editing/instruct_pix2pix/sizing.py) and the ``editlab ip2p`` command:
single edits, the guidance-scale grid and the instruction-embedding option, with parameters in every PNG."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from editing.cli import main
from editing.instruct_pix2pix.sizing import edit_size, fit, kept_size, prepare_image, size_multiple
from ldm.config import instruct_pix2pix, sd15, tiny_sd1, toy
from ldm.images import read_parameters
from ldm.model import StableDiffusion
from tests.peers import randomize_

CFG = tiny_sd1(8)  # size multiple 2 (VAE) × 4 (two UNet downsamplings) = 8


@pytest.mark.parametrize("size,expected", [
    ((1024, 768), (512, 384)),  # docs/methods.md §6.1
    ((768, 1024), (384, 512)),
    ((512, 512), (512, 512)),
    ((256, 256), (512, 512)),  # small images are scaled up
    ((1000, 700), (512, 384)),  # short side 358.4 -> 384 rounds up; the long side 548.6 floors to 512
    ((640, 360), (512, 320)),  # 288 -> 320; 568.9 -> 512
    ((1920, 1080), (512, 320)),
])
def test_edit_cli_sizing_rule(size, expected):
    assert edit_size(*size, resolution=512, multiple=64) == expected


def test_size_multiple_and_native_resolution():
    assert size_multiple(sd15()) == size_multiple(instruct_pix2pix()) == 64  # VAE 8 × 3 downsamplings
    assert size_multiple(toy()) == 16 and size_multiple(CFG) == 8
    assert edit_size(96, 64, resolution=64, multiple=16) == (64, 48)  # the toy model's long side goes to 64
    # --resolution 768: the short side 460.8 rounds up to 512, so the long side (853.3 -> 832) passes 768
    assert edit_size(100, 60, resolution=768, multiple=64) == (832, 512)
    assert kept_size(100, 70, 16) == (96, 64)
    with pytest.raises(ValueError, match="too elongated"):
        edit_size(2000, 10)  # edit_cli.py would make it 12800x64
    with pytest.raises(ValueError, match="smaller than 64 pixels"):
        kept_size(100, 40, 64)


def test_fit_centre_crops_then_resizes():
    """A 300×100 image of three 100-px bands (red, green, blue) fitted to 32×32 keeps only the green middle."""
    bands = np.zeros((100, 300, 3), np.uint8)
    bands[:, :100, 0], bands[:, 100:200, 1], bands[:, 200:, 2] = 255, 255, 255
    fitted = np.asarray(fit(Image.fromarray(bands), (32, 32)), dtype=np.int16)
    assert fitted.shape == (32, 32, 3)
    inner = fitted[:, 2:-2]  # LANCZOS reads a few source pixels beyond the crop box at the edges
    assert (inner[..., 1] >= 250).all() and (inner[..., [0, 2]] <= 5).all() and (fitted[..., [0, 2]] < 64).all()
    tensor = prepare_image(Image.fromarray(bands), CFG, resolution=48)  # 300×100 -> 48×16
    assert tensor.shape == (1, 3, 16, 48) and 0.0 <= tensor.min() and tensor.max() <= 1.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip2p-cli")
    randomize_(StableDiffusion(CFG), seed=1).save(folder / "tiny-ip2p.safetensors")
    picture = (torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(picture).save(folder / "input.png")
    return folder


def run_ip2p(files, *args) -> int:
    return main(["ip2p", "--weights", str(files / "tiny-ip2p.safetensors"), "--image", str(files / "input.png"),
                 "--steps", "2", "--resolution", "32", *map(str, args)])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_grid_mode_writes_the_grid_and_every_cell(files, capsys):
    out = files / "grid.png"
    assert run_ip2p(files, "--instruction", "make it snowy", "--grid-text", "5,7.5", "--grid-image", "1,1.5",
                    "--out", out) == 0
    cells = {(t, i): files / f"grid-t{t}-i{i}.png" for t in ("5", "7.5") for i in ("1", "1.5")}
    assert sorted(p.name for p in files.glob("grid*.png")) == sorted(["grid.png", *(p.name for p in cells.values())])
    for (t, i), path in cells.items():
        params = read_parameters(path)
        assert params["text_guidance"] == float(t) and params["image_guidance"] == float(i)
        assert params["instruction"] == "make it snowy" and params["steps"] == 2 and params["scheduler"] == "euler-a"
        assert (params["width"], params["height"]) == (32, 24)  # 60×40: short side 21.3 -> 24, long 36 -> 32
        assert pixels(path).shape == (24, 32, 3)
    assert np.abs(pixels(cells["5", "1"]) - pixels(cells["7.5", "1.5"])).max() > 10  # the scales matter
    grid = read_parameters(out)
    assert grid["grid_text"] == [5.0, 7.5] and grid["grid_image"] == [1.0, 1.5] and len(grid["cells"]) == 4
    # layout: a 48-px label column, a 16-px label row, then the input column and one column per text scale
    picture = pixels(out)
    assert picture.shape == (16 + 2 * 24, 48 + 3 * 32, 3)
    assert np.array_equal(picture[16 + 24:, 48 + 64:], pixels(cells["7.5", "1.5"]))

    single = files / "single.png"  # the same edit alone equals its grid cell
    assert run_ip2p(files, "--instruction", "make it snowy", "--text-guidance", "7.5", "--image-guidance", "1.5",
                    "--out", single) == 0
    assert np.array_equal(pixels(single), pixels(cells["7.5", "1.5"]))
    assert read_parameters(single)["image_sha256"] == grid["image_sha256"]


def test_instruction_embedding_option(files, capsys):
    model = StableDiffusion.load(files / "tiny-ip2p.safetensors")
    with torch.no_grad():
        save_file({"instruction_embedding": model.encode_prompt(["make it red"])[0]}, str(files / "red.safetensors"))
    assert run_ip2p(files, "--instruction", "make it red", "--out", files / "text.png") == 0
    assert run_ip2p(files, "--instruction-embedding", files / "red.safetensors", "--out", files / "emb.png") == 0
    assert np.array_equal(pixels(files / "text.png"), pixels(files / "emb.png"))
    assert read_parameters(files / "emb.png")["instruction_embedding"] == "red.safetensors"


def test_cli_errors_are_one_line(files, capsys, tmp_path):
    assert run_ip2p(files, "--out", tmp_path / "x.png") == 2
    assert "give --instruction TEXT or --instruction-embedding FILE" in capsys.readouterr().err
    assert run_ip2p(files, "--instruction", "x", "--grid-text", "5,a", "--out", tmp_path / "x.png") == 2
    assert "--grid-text '5,a': give comma-separated numbers" in capsys.readouterr().err
    StableDiffusion(tiny_sd1()).save(tmp_path / "plain.safetensors")
    code = main(["ip2p", "--weights", str(tmp_path / "plain.safetensors"), "--image", str(files / "input.png"),
                 "--instruction", "x", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "is a text-to-image model (4-channel UNet); 'editlab ip2p' needs an InstructPix2Pix editor" in err and len(err.strip().splitlines()) == 1


def test_keep_size_floors_the_input_to_the_size_multiple(files, tmp_path):
    assert run_ip2p(files, "--instruction", "x", "--steps", "1", "--keep-size", "--out", tmp_path / "kept.png") == 2
    out = tmp_path / "kept.png"  # --resolution (given by run_ip2p) and --keep-size contradict; without it:
    assert main(["ip2p", "--weights", str(files / "tiny-ip2p.safetensors"), "--image", str(files / "input.png"),
                 "--instruction", "x", "--steps", "1", "--keep-size", "--out", str(out)]) == 0
    assert pixels(out).shape == (40, 56, 3) and read_parameters(out)["sizing"] == "keep-size"  # 60×40 -> 56×40
