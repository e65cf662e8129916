"""ControlNet training on the user's own folder (controls.train.folder_triples, editlab train-controlnet
--data DIR): targets and hints load at the asked size and range, missing hints are the target's Canny edges,
given hints are read as they are, bad folders fail in one line, and the command trains on a folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from controls import ControlNet
from controls.hints import canny_hint
from controls.train import folder_triples
from editing.cli import main
from ldm.config import tiny_sd1
from ldm.images import file_sha256, load_image
from ldm.model import StableDiffusion
from ldm.toy.shapes import render, spec_from_caption, to_tensor
from tests.peers import randomize_

CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a yellow triangle on a purple background", "a white cross on a red background"]
WITH_HINT = (1, 3)  # these lines name a "source" hint file (the shape's mask); the others are detected


def _write_folder(folder, size=64):
    (folder / "images").mkdir(parents=True)
    (folder / "hints").mkdir()
    lines, renders, masks = [], [], []
    for k, caption in enumerate(CAPTIONS):
        image, mask = render(spec_from_caption(caption, center=(0.4 + 0.05 * k, 0.5)), size)
        Image.fromarray(image).save(folder / "images" / f"{k}.png")
        entry = {"target": f"images/{k}.png", "prompt": caption}
        if k in WITH_HINT:
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "hints" / f"{k}.png")
            entry["source"] = f"hints/{k}.png"
        lines.append(json.dumps(entry))
        renders.append(image)
        masks.append(mask)
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return renders, masks


def test_folder_triples_load_targets_hints_and_detect_missing_hints(tmp_path):
    renders, masks = _write_folder(tmp_path)
    images, hints, captions = folder_triples(tmp_path, 64, detect="canny")
    assert images.shape == hints.shape == (4, 3, 64, 64) and captions == CAPTIONS
    assert images.min() >= -1 and images.max() <= 1 and hints.min() == 0 and hints.max() == 1
    expected = torch.stack([to_tensor(image) for image in renders])  # lossless PNG: the same pixels, in [−1, 1]
    assert torch.allclose(images, expected, atol=1e-6)
    for k in range(4):
        if k in WITH_HINT:  # read from the file: the mask, 3 channels
            assert torch.equal(hints[k], torch.from_numpy(masks[k]).float().expand(3, -1, -1))
        else:  # detected: the released annotator on the target
            detected = canny_hint(load_image(tmp_path / f"images/{k}.png"), 64)[0]
            assert torch.equal(hints[k], detected) and 0.02 < hints[k].mean() < 0.3
    small, small_hints, _ = folder_triples(tmp_path, 16)  # resized on load
    assert small.shape == small_hints.shape == (4, 3, 16, 16)


def test_folder_errors_are_one_line_and_name_the_line(tmp_path):
    _write_folder(tmp_path)
    with pytest.raises(ValueError, match=r"line 1: no \"source\""):
        folder_triples(tmp_path, 16, detect=None)  # line 1 has no hint and nothing detects one
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(manifest.read_text() + '{"target": "images/0.png"}\n')
    with pytest.raises(ValueError, match=r"line 5: need an object with string \"target\" and \"prompt\""):
        folder_triples(tmp_path, 16)
    manifest.write_text('{"target": "images/0.png", "prompt": "a red circle"\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        folder_triples(tmp_path, 16)
    manifest.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        folder_triples(tmp_path, 16)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="no prompts.jsonl or metadata.jsonl"):
        folder_triples(tmp_path, 16)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "sd.safetensors"
    randomize_(StableDiffusion(tiny_sd1()), 0).save(path)
    return path


def _command(weights, data, out):
    return ["train-controlnet", "--weights", str(weights), "--data", str(data), "--size", "16", "--steps", "2",
            "--batch", "2", "--lr", "1e-3", "--out", str(out)]


def test_command_trains_on_a_folder_and_records_it(tmp_path, tiny_weights):
    data = tmp_path / "data"
    _write_folder(data)
    (data / "prompts.jsonl").rename(data / "metadata.jsonl")  # diffusers' name works too
    out = tmp_path / "folder.safetensors"
    assert main(_command(tiny_weights, data, out)) == 0
    with safe_open(str(out), "pt") as file:
        metadata = file.metadata()
        weights = {key: file.get_tensor(key) for key in file.keys()}
    assert metadata["data"] == str(data.resolve()) and metadata["images"] == "4" and metadata["detect"] == "canny"
    assert metadata["data_sha256"] == file_sha256(data / "metadata.jsonl")
    start = ControlNet.from_unet(StableDiffusion.load(tiny_weights).unet, (16, 32),
                                 torch.Generator().manual_seed(0)).state_dict()  # the command's init
    assert weights.keys() == start.keys()
    assert weights["controlnet_mid_block.weight"].abs().max() > 0  # the zero conv trained


def test_command_reports_a_missing_image_in_one_line(tmp_path, tiny_weights, capsys):
    data = tmp_path / "data"
    _write_folder(data)
    (data / "images" / "2.png").unlink()
    assert main(_command(tiny_weights, data, tmp_path / "out.safetensors")) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "line 3" in error and "2.png" in error and "not found" in error
    assert not (tmp_path / "out.safetensors").exists()
