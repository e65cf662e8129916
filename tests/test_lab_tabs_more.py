"""The lab's InstructPix2Pix, ControlNet, Style and Visii tabs (editing/lab/tab_*.py), without a browser.

For each tab: the command line it shows, run by the CLI in a subprocess in an empty folder holding only the uploads,
writes the same bytes as the PNG(s) it shows; bad input shows exactly the one line the CLI prints for that line.
Toy model, few steps, one thread.
"""

import os
import shlex
import shutil
import subprocess
import sys
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from controls import CannyConfig, ControlNet
from editing.cli import main
from editing.commands.controlnet import make_hints
from editing.commands.train_controlnet import hint_channels
from editing.lab import tab_controlnet, tab_ip2p, tab_style, tab_visii
from editing.lab.app import build_app
from editing.lab.context import LabContext
from editing.lab.inputs import toy_scene, toy_scene_file
from editing.options import TOY_WEIGHTS
from ldm.images import read_parameters
from ldm.model import StableDiffusion

TABS = (tab_ip2p, tab_controlnet, tab_style, tab_visii)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return LabContext(folder=tmp_path_factory.mktemp("lab"), threads=1)


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """A tiny random ControlNet for the toy model (none is bundled): the toy UNet's encoder, a hint encoder that
    downsamples by the toy VAE's factor 4, and random (not zero) output convs so the hint changes the image."""
    model = StableDiffusion.load(TOY_WEIGHTS)
    generator = torch.Generator().manual_seed(0)
    net = ControlNet.from_unet(model.unet, hint_channels(model.config.vae.downsample_factor), generator)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=generator))
    path = tmp_path_factory.mktemp("controlnet") / "toy-controlnet.safetensors"
    net.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad uploads: bytes no image reader takes, and images of sizes the commands refuse."""
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "garbage.png").write_bytes(b"this is not a PNG")
    toy_scene("blue square").resize((200, 8)).save(folder / "elongated.png")  # 25:1, beyond what ip2p resizes
    toy_scene("blue square").resize((30, 30)).save(folder / "odd.png")  # not a multiple of 8
    return folder


@dataclass
class Replayed:
    command: str  # what the tab's arguments() gave
    args: list
    uploads: dict
    shown: dict  # what the tab showed (handle's values by name)
    replay: Future  # -> the folder where its command lines ran in a subprocess


def pngs(shown) -> list[Path]:
    """The PNGs a tab shows (and offers for download)."""
    return [Path(p) for p in shown["files"] or [] if p.endswith(".png")]


@pytest.fixture(scope="module")
def replayed(lab, controlnet, tmp_path_factory):
    """Each tab run here with the knobs below; its command lines replayed in a subprocess in a background thread
    while the next tab runs (each subprocess spends seconds importing torch: overlapping them halves the wait)."""
    cases = {
        "ip2p": (tab_ip2p, dict(instruction="make the square green", steps=3, grid=True, grid_text="3,7.5",
                                grid_image="1.5"), {}),
        "controlnet": (tab_controlnet, dict(control=controlnet, canny_low=50, canny_high=120, scale=0.8,
                                            guess_mode=True, steps=3), {}),
        "style": (tab_style, dict(prompt="", scale=0.7, selection=tab_style.CHOSEN_BLOCKS,
                                  blocks=["up_blocks.1.attentions.0", "mid_block"], steps=3), {}),
        "visii": (tab_visii, dict(init="make the shape", steps=12, lr=0.01), dict(apply_steps=3)),
    }
    runs = {}
    with ThreadPoolExecutor(len(cases)) as pool:
        for name, (tab, knobs, extra) in cases.items():
            command, args, uploads = tab.arguments(**knobs)
            shown = tab.handle(lab, **knobs, **extra)
            assert shown["message"].startswith("done"), shown["message"]
            folder = tmp_path_factory.mktemp(f"replay-{name}") / "empty"
            runs[name] = Replayed(command, args, uploads, shown, pool.submit(replay, shown, uploads, folder))
        yield runs


def replay(shown, uploads, folder):
    """Run each `editlab ...` line of the shown command line as `python -m editing.cli ...` in an empty
    ``folder`` holding only copies of the uploads; returns the folder."""
    folder.mkdir()
    for name in uploads:
        shutil.copy(Path(shown["folder"]) / name, folder / name)
    for line in shown["command_line"].split(tab_visii.SEPARATOR):
        words = shlex.split(line)
        assert words[0] == "editlab"
        done = subprocess.run([sys.executable, "-m", "editing.cli", *words[1:]], cwd=folder, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode == 0, done.stderr
    return folder


def assert_same_pngs(shown, folder):
    """Every PNG the tab shows has a twin at the same place in the replay's folder, byte for byte, and the replay
    wrote no other PNG."""
    run_folder, images = Path(shown["folder"]), pngs(shown)
    assert images and shown["image"] in map(str, images)
    for image in images:
        assert (folder / image.relative_to(run_folder)).read_bytes() == image.read_bytes(), image.name
    uploaded = {p.relative_to(run_folder) for p in run_folder.glob("*.png") if p not in images}
    written = {p.relative_to(folder) for p in folder.rglob("*.png")} - uploaded
    assert written == {p.relative_to(run_folder) for p in images}


def cli_message(shown, folder, monkeypatch, capsys, keep=()):
    """The one line the CLI prints (stderr) for the last line of ``shown``'s command line, run by
    editing.cli.main in a copy of the tab's run folder (``keep``: what of it to copy; default all of it)."""
    shutil.copytree(shown["folder"], folder, ignore=lambda _, names: [n for n in names if keep and n not in keep])
    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(shlex.split(shown["command_line"].split(tab_visii.SEPARATOR)[-1])[1:]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def shown_line(lab, command, args):
    return shlex.join(["editlab", command, *lab.model_arguments(), *args])


# ------------------------------------------------------------------------------------------ InstructPix2Pix


def test_ip2p_grid_reproduced_by_its_command_line(lab, replayed):
    run = replayed["ip2p"]
    shown = run.shown
    assert shown["command_line"] == shown_line(lab, run.command, run.args) and set(run.uploads) == {"image.png"}
    assert Path(shown["image"]).name == "grid.png"
    assert [Path(p).name for p in shown["cells"]] == ["grid-t3-i1.5.png", "grid-t7.5-i1.5.png"]
    assert read_parameters(shown["image"])["grid_text"] == [3.0, 7.5]
    assert read_parameters(shown["cells"][1])["text_guidance"] == 7.5
    # the default upload is the toy scene itself
    uploaded = Path(shown["folder"]) / "image.png"
    assert np.array_equal(np.asarray(Image.open(uploaded)), np.asarray(toy_scene("blue square")))
    assert_same_pngs(shown, run.replay.result())


def test_ip2p_bad_uploads_show_the_cli_line(lab, files, tmp_path, monkeypatch, capsys):
    for name, words in (("garbage.png", "not an image PIL can read"), ("elongated.png", "too elongated")):
        shown = tab_ip2p.handle(lab, image=files / name, steps=2)
        assert shown["image"] is None and words in shown["message"]
        assert shown["message"] == cli_message(shown, tmp_path / name, monkeypatch, capsys, keep=("image.png",))


# ------------------------------------------------------------------------------------------------ ControlNet


def test_controlnet_reproduced_by_its_command_line(lab, replayed):
    run = replayed["controlnet"]
    shown = run.shown
    assert shown["command_line"] == shown_line(lab, run.command, run.args)
    params = read_parameters(shown["image"])
    assert (params["canny_low"], params["canny_high"], params["guess_mode"]) == (50, 120, True)
    assert params["controls"][0]["scale"] == 0.8
    assert_same_pngs(shown, run.replay.result())


def test_canny_preview_is_the_commands_hint(lab):
    """The preview is the hint the command detects (make_hints, as `editlab controlnet --detect canny` runs it),
    and it moves with the thresholds."""
    model = types.SimpleNamespace(config=StableDiffusion.load(TOY_WEIGHTS).config)
    path = toy_scene_file(lab.folder, "blue square")
    edges = {}
    for low, high in ((50, 120), (100, 200), (700, 900)):
        preview, message = tab_controlnet.canny_preview(lab, path, low, high)
        args = types.SimpleNamespace(hint=None, detect="canny", image=path, canny_low=low, canny_high=high,
                                     height=None, width=None)
        (hint,), _ = make_hints(args, model, 1)
        assert message == "" and preview.size == (64, 64)
        assert np.array_equal(np.asarray(preview), (hint[0] * 255).round().byte().permute(1, 2, 0).numpy())
        edges[low] = int((np.asarray(preview)[..., 0] > 127).sum())
    # the square's outline is a sharp step (|gx| + |gy| about 600 across its anti-aliased pixels): every edge
    # pixel passes thresholds of 50 to 200 and none 700
    assert edges[50] == edges[100] > 100 and edges[700] == 0
    assert tab_controlnet.canny_preview(lab, path, 200, 100)[1].startswith("editlab controlnet: error: Canny "
                                                                          "thresholds need 0 <= low <= high")


def test_controlnet_bad_inputs_show_the_cli_line(lab, controlnet, files, tmp_path, monkeypatch, capsys):
    cases = [(dict(image=files / "garbage.png"), "not an image PIL can read", "image.png"),
             (dict(hint_source="upload", hint=files / "odd.png"), "hint size must be", "hint.png"),
             (dict(control=tmp_path / "missing.safetensors"), "not found", "image.png")]
    for k, (knobs, words, upload) in enumerate(cases):
        shown = tab_controlnet.handle(lab, **{"control": controlnet, "steps": 2, **knobs})
        assert shown["image"] is None and words in shown["message"], shown["message"]
        assert shown["message"] == cli_message(shown, tmp_path / str(k), monkeypatch, capsys, keep=(upload,))
        if k == 0:  # the preview of the unreadable photo says what the command says of it, under its own name
            preview, message = tab_controlnet.canny_preview(lab, files / "garbage.png")
            assert preview is None and message == shown["message"].replace("image.png", str(files / "garbage.png"))
    # no ControlNet file: the tab says none is bundled, before running anything
    assert "none is bundled with the toy model" in tab_controlnet.handle(lab)["message"]


# ---------------------------------------------------------------------------------------------------- Style


def test_style_blocks_come_from_the_model_config(lab):
    config = StableDiffusion.load(TOY_WEIGHTS).config.unet
    assert config.attention_levels == (False, True, False) and config.layers_per_level == 1  # the toy UNet
    # attention at level 1 only: down_blocks.1 (1 attention), up_blocks.1 (2: the decoder has one layer more),
    # and the middle block
    assert tab_style.block_choices(lab) == ["down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.1.attentions.0",
                                            "up_blocks.1.attentions.1"]
    assert tab_style.layer_scales(lab, 0.5, "style") == {"up_blocks.1.attentions.0": 0.5,
                                                         "up_blocks.1.attentions.1": 0.5}
    assert tab_style.layer_scales(lab, 0.7, tab_style.CHOSEN_BLOCKS, ["mid_block"]) == {"mid_block.attentions.0": 0.7}
    svg = tab_style.diagram(lab, 0.5, "style")
    assert svg.count('fill="#f08c00"') == 2 and svg.count("λ = 0.5") == 2 and svg.count("λ = 0<") == 2
    assert svg.count("no attention") == 4  # down_blocks.0/2 and up_blocks.0/2


def test_style_reproduced_by_its_command_line(lab, replayed):
    run = replayed["style"]
    shown = run.shown
    assert shown["command_line"] == shown_line(lab, run.command, run.args)
    assert read_parameters(shown["image"])["blocks"] == {"up_blocks.1.attentions.0": 0.7, "mid_block": 0.7}
    assert_same_pngs(shown, run.replay.result())


def test_style_bad_inputs_show_the_cli_line(lab, files, tmp_path, monkeypatch, capsys):
    shown = tab_style.handle(lab, style_image=files / "garbage.png", steps=2)
    assert "not an image PIL can read" in shown["message"]
    assert shown["message"] == cli_message(shown, tmp_path / "garbage", monkeypatch, capsys,
                                           keep=("style-image.png",))
    # a preset whose blocks this model lacks: the command's line, and the diagram says the same
    shown = tab_style.handle(lab, selection="style+layout", steps=2)
    assert "has no cross-attention layer in this model" in shown["message"]
    assert shown["message"] == cli_message(shown, tmp_path / "preset", monkeypatch, capsys,
                                           keep=("style-image.png",))
    assert shown["message"] in tab_style.diagram(lab, 1.0, "style+layout").replace("&#x27;", "'")


# ---------------------------------------------------------------------------------------------------- Visii


def test_visii_learns_plots_and_applies_as_its_command_lines(lab, replayed):
    run = replayed["visii"]
    shown = run.shown
    apply, apply_args, _ = tab_visii.apply_arguments(steps=3)
    assert shown["command_line"] == (shown_line(lab, run.command, run.args) + " && "
                                     + shown_line(lab, apply, apply_args))
    losses = Path(shown["folder"]) / "visii" / "losses.csv"
    rows = tab_visii.read_losses(losses)
    with safe_open(shown["files"][0], "pt") as f:  # the learned instruction, offered for download
        best_step = int(f.metadata()["best_step"])
    assert [r["step"] for r in rows] == list(range(1, 13)) and [r["step"] for r in rows if r["best"]] == [best_step]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    d, average = 0.9, 0.0  # the optimiser's smoothing: a bias-corrected moving average of the raw losses
    for k, r in enumerate(rows, start=1):
        average = d * average + (1 - d) * r["loss"]
        assert r["smoothed"] == pytest.approx(average / (1 - d ** k), rel=1e-12)  # float64 on both sides
    assert len(shown["curve"]) == 24 and set(shown["curve"]["curve"]) == {"loss", "smoothed"}
    assert list(shown["curve"]["value"][::2]) == [r["loss"] for r in rows]
    assert f"kept the states after step {best_step}" in shown["learned"]
    assert read_parameters(shown["image"])["instruction_embedding"] == "instruction.safetensors"
    folder = run.replay.result()
    assert_same_pngs(shown, folder)
    assert (folder / "visii" / "losses.csv").read_bytes() == losses.read_bytes()


def test_visii_bad_inputs_show_the_cli_line(lab, files, tmp_path, monkeypatch, capsys):
    shown = tab_visii.handle(lab, before=files / "garbage.png", steps=2)
    assert "not an image PIL can read" in shown["message"] and shown["image"] is None
    assert shown["message"] == cli_message(shown, tmp_path / "garbage", monkeypatch, capsys)
    # learning works, applying to an image the editor cannot size fails with the ip2p line
    shown = tab_visii.handle(lab, image=files / "elongated.png", steps=2, apply_steps=2)
    assert shown["message"].startswith("editlab ip2p: error: image of 200x8 is too elongated")
    assert shown["message"] == cli_message(shown, tmp_path / "elongated", monkeypatch, capsys)


# ----------------------------------------------------------------------------------------------- the tabs


def test_tabs_build_in_the_app(lab):
    import gradio as gr

    app = build_app(lab)
    titles = [block.label for block in app.blocks.values() if isinstance(block, gr.Tab)]
    assert titles[-4:] == [tab.TITLE for tab in TABS] == ["InstructPix2Pix", "ControlNet", "Style", "Visii"]
