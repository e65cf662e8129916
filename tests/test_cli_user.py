"""The command line as a user meets it, one test per finding: each runs the real ``editlab`` command in a
subprocess (``python -m editing.cli``) on the bundled toy model, and checks what the user sees (exit status,
one-line errors, files, PNG metadata). Cheap variants of the same check call ``editing.cli.main`` in-process."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from editing.cli import build_parser, main
from editing.options import TOY_IP2P_WEIGHTS, TOY_WEIGHTS
from ldm.images import read_parameters
from ldm.toy.readers import read_shape
from ldm.toy.shapes import render, spec_from_caption

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red circle on a blue background"


def editlab(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "editing.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def one_line_error(stderr: str, *needles: str) -> str:
    """The single error line of a failed command (warnings and progress bars aside), holding every needle."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def fails(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    return one_line_error(result.stderr, *needles)


def fails_in_process(capsys, argv, *needles: str) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    return one_line_error(capsys.readouterr().err, *needles)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------------ finding 1


def test_1_a_learned_token_is_used_by_generate_and_loads_in_diffusers(tmp_path, capsys):
    images = tmp_path / "triangles"
    images.mkdir()
    for k, (center, size) in enumerate([((0.4, 0.45), 0.4), ((0.6, 0.55), 0.45), ((0.5, 0.5), 0.5), ((0.45, 0.6), 0.4)]):
        picture, _ = render(spec_from_caption("a red triangle on a blue background", center=center, size=size))
        Image.fromarray(picture).save(images / f"{k}.png")
    learned = tmp_path / "t.safetensors"
    result = editlab("textual-inversion", "--images", images, "--token", "<tok>", "--init-word", "shape",
                     "--template", "a red {} on a blue background", "--steps", 40, "--batch", 2, "--lr", 0.05,
                     "--threads", 1, "--out", learned)
    assert result.returncode == 0, result.stderr
    rows = load_file(str(learned))["<tok>"].reshape(1, -1)  # [d] -> [1, d]

    # the same rows as AUTOMATIC1111 .pt (token named in the file) and as a .safetensors with emb_params
    # (token: the file name), loaded together with the diffusers-format file
    torch.save({"string_to_param": {"*": rows}, "name": "<a1>"}, tmp_path / "a1.pt")
    save_file({"emb_params": rows}, str(tmp_path / "tri-a1111.safetensors"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red <tok> on a blue background\n# the same rows under other names\n"
                       "a red <a1> on a blue background\na red tri-a1111 on a blue background\n"
                       "a red shape on a blue background\n")
    result = editlab("generate", "--embedding", learned, "--embedding", tmp_path / "a1.pt", "--embedding",
                     tmp_path / "tri-a1111.safetensors", "--prompts", prompts, "--batch", 4, "--steps", 15,
                     "--threads", 1, "--out", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr
    shapes = {p: [read_shape(pixels(tmp_path / f"g-{p}-{k}.png")) for k in range(4)] for p in (1, 2, 3, 4)}
    assert shapes[1].count("triangle") >= 3, shapes  # the learned shape (3 of 4 when written, 1 circle)
    assert shapes[4].count("triangle") == 0, shapes  # the initializer word alone draws diamonds
    for p in (2, 3):  # every file format gives the same pixels: the same rows reach the text encoder
        for k in range(4):
            assert np.array_equal(pixels(tmp_path / f"g-1-{k}.png"), pixels(tmp_path / f"g-{p}-{k}.png"))
    params = read_parameters(tmp_path / "g-1-0.png")
    assert params["prompt"] == "a red <tok> on a blue background" and set(params["embeddings"]) == {
        "<tok>", "<a1>", "tri-a1111"}

    # a <token> nobody defined is an error naming it (instead of silent BPE pieces)
    fails(editlab("generate", "--prompt", "a <my-shape> on a blue background", "--out", tmp_path / "x.png"),
          "<my-shape>", "--embedding")
    fails_in_process(capsys, ["p2p", "--embedding", learned, "--prompt", "a red <tok> on a blue background",
                              "--edit", "a red <tox> on a blue background", "--out", tmp_path / "p"], "<tox>")

    # the file the CLI wrote loads in diffusers and gives the same text embedding as editlab
    from editing.bench.peers import diffusers_pipeline
    from inversion.textual_inversion import load_textual_inversion
    from ldm.model import StableDiffusion

    model = StableDiffusion.load(TOY_WEIGHTS)
    pipe = diffusers_pipeline(model)
    pipe.load_textual_inversion(str(learned))
    with torch.no_grad():
        theirs = pipe.encode_prompt("a red <tok> on a blue background", "cpu", 1, False)[0]
        load_textual_inversion(model, learned)
        ours = model.encode_prompt(["a red <tok> on a blue background"])
    assert (ours - theirs).abs().max() <= 1e-5  # two implementations of the same layers: fp32 rounding only


# ------------------------------------------------------------------------------------------------ finding 3


def test_3_the_weights_are_checked_against_the_command_before_work(tmp_path, capsys):
    fails(editlab("generate", "--weights", TOY_IP2P_WEIGHTS, "--prompt", CAPTION, "--out", tmp_path / "x.png"),
          "InstructPix2Pix editor (8-channel UNet)", "'editlab generate' needs a text-to-image model", "editlab ip2p")
    picture, _ = render(spec_from_caption(CAPTION))
    Image.fromarray(picture).save(tmp_path / "in.png")
    fails_in_process(capsys, ["ip2p", "--weights", TOY_WEIGHTS, "--image", tmp_path / "in.png", "--instruction", "x",
                              "--out", tmp_path / "x.png"], "is a text-to-image model", "needs an InstructPix2Pix")
    save_file({"<x>": torch.zeros(64)}, str(tmp_path / "emb.safetensors"))
    fails_in_process(capsys, ["sdedit", "--weights", tmp_path / "emb.safetensors", "--image", tmp_path / "in.png",
                              "--prompt", CAPTION, "--out", tmp_path / "x.png"],
                     "is a textual-inversion embedding", "--embedding FILE")
    assert not (tmp_path / "x.png").exists()

    # --clip with another CLIP than ViT-L/14 and no --clip-config: one line, not a state-dict traceback
    save_file({"visual.conv1.weight": torch.zeros(64, 3, 16, 16)}, str(tmp_path / "small-clip.safetensors"))
    fails_in_process(capsys, ["visii", "--clip", tmp_path / "small-clip.safetensors", "--before", tmp_path / "in.png",
                              "--after", tmp_path / "in.png", "--steps", "1", "--out", tmp_path / "v"],
                     "do not fit CLIP ViT-L/14", "--clip-config")

    # --weights takes a diffusers folder, converted in memory: the same pixels as the editlab file
    from editing.bench.peers import diffusers_pipeline
    from ldm.model import StableDiffusion

    diffusers_pipeline(StableDiffusion.load(TOY_WEIGHTS)).save_pretrained(tmp_path / "toy-diffusers")
    common = ["--prompt", CAPTION, "--steps", "4", "--height", "64", "--width", "64"]
    result = editlab("generate", "--weights", tmp_path / "toy-diffusers", *common, "--out", tmp_path / "folder.png")
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stderr and "missing 0, unexpected 0" in result.stderr
    assert main(["generate", *common, "--out", str(tmp_path / "file.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "file.png"))  # exact: same tensors


# ------------------------------------------------------------------------------------------------ finding 5


def test_5_inputs_and_outputs_are_checked_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    fails(editlab("generate", "--prompt", CAPTION, "--out", tmp_path / "a-file" / "x.png"), "is a file, not a folder")
    (tmp_path / "looks-like.png").mkdir()
    fails_in_process(capsys, ["generate", "--prompt", CAPTION, "--out", tmp_path / "looks-like.png"], "is a folder")
    fails_in_process(capsys, ["p2p", "--prompt", CAPTION, "--edit", CAPTION, "--out", tmp_path / "a-file"],
                     "is a file; the output is a folder")
    fails(editlab("generate", "--device", "gpu", "--prompt", CAPTION, "--out", tmp_path / "x.png"), "unknown device")
    if not torch.cuda.is_available():
        fails_in_process(capsys, ["generate", "--device", "cuda", "--prompt", CAPTION, "--out", tmp_path / "x.png"],
                         "no CUDA GPU", "--device cpu")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse's own message: usage and "invalid choice", no traceback
        main(["bench", "sample", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    line = fails(editlab("generate", "--prompt", CAPTION, "--height", 100000, "--width", 100000, "--out",
                         tmp_path / "x.png"), "GiB more than the", "smaller --width/--height")
    assert float(line.split("needs at least ")[1].split(" GiB")[0]) > 1000  # 1e10 pixels: terabytes
    assert not (tmp_path / "x.png").exists()

    # a learning rate no optimiser here can take is refused before the model loads (a loss that turns NaN
    # during a run is stopped by the Trainer: tests/test_training.py)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(render(spec_from_caption(CAPTION))[0]).save(folder / "0.png")
    for lr in ("1e30", "0", "nan"):
        fails_in_process(capsys, ["textual-inversion", "--images", folder, "--token", "<n>", "--init-word", "shape",
                                  "--lr", lr, "--out", tmp_path / "n.safetensors"], "give a learning rate in (0, 1]")
    assert not (tmp_path / "n.safetensors").exists()
    # -v shows the traceback
    result = editlab("-v", "generate", "--device", "gpu", "--prompt", CAPTION, "--out", tmp_path / "x.png")
    assert result.returncode != 0 and "Traceback" in result.stderr


# ------------------------------------------------------------------------------------------------ finding 6


def test_6_help_shows_defaults_and_the_defaults_fit_the_options(tmp_path):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            default = action.default
            if any(default is v for v in (None, False, argparse.SUPPRESS)) or default == [] or action.dest == "help":
                continue
            assert action.help and ("default" in action.help), (name, action.dest)  # stated in --help
        assert any(a.dest == "threads" for a in command._actions), name  # --threads everywhere (finding 9)
        assert "default" in command.format_help()
    result = editlab("generate", "--help")
    text = " ".join(result.stdout.split())
    assert "--steps STEPS default: 50" in text and "(default: 7.5)" in text and "where the model runs" in text
    assert "ip2p" in commands and "default: 100" in " ".join(commands["ip2p"].format_help().split())
    assert "default: euler-a" in " ".join(commands["ip2p"].format_help().split())
    assert "default: 0.8" in " ".join(commands["sdedit"].format_help().split())
    result = editlab("--version")
    assert result.returncode == 0 and result.stdout.startswith("editlab ")

    # ddpm-edit: the paper's skip (36 of 100 steps) scales with --steps
    Image.fromarray(render(spec_from_caption(CAPTION))[0]).save(tmp_path / "in.png")
    result = editlab("ddpm-edit", "--image", tmp_path / "in.png", "--source-prompt", CAPTION, "--target-prompt",
                     "a green circle on a blue background", "--steps", 10, "--out", tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert read_parameters(tmp_path / "d" / "edit-0.png")["skip"] == 4  # round(36 * 10 / 100)

    # p2p: a pure reweight needs no --edit (it defaults to the prompt)
    result = editlab("p2p", "--prompt", CAPTION, "--reweight", "red=2", "--steps", 3, "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    params = read_parameters(tmp_path / "r" / "edited.png")
    assert params["edits"] == [CAPTION] and params["reweight"] == {"red": 2.0}


# ------------------------------------------------------------------------------------------------ finding 7


def test_7_images_and_prompts_are_read_as_the_user_means_them(tmp_path, capsys):
    upright = np.zeros((48, 64), np.uint8)  # [H, W]: a dark left half, a light right half, a band on top
    upright[:, 32:] = 200
    upright[:8] = 100
    Image.fromarray(upright).convert("RGB").save(tmp_path / "upright.png")
    # the same picture as a phone stores it: rotated, 16 bits a channel, with the EXIF orientation to undo
    stored = Image.fromarray(np.rot90(upright, k=1).astype(np.uint16) * 257)  # 8-bit v -> 16-bit 257·v
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90° clockwise
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "phone.png").mode == "I;16" and Image.open(tmp_path / "phone.png").size == (48, 64)

    long_prompt = CAPTION + " " + " ".join(["red"] * 68) + " zebra giraffe"  # 7 + 68 + 2 tokens
    common = ["--prompt", long_prompt, "--strength", "0.5", "--steps", "2"]
    result = editlab("sdedit", "--image", tmp_path / "phone.png", *common, "--out", tmp_path / "phone-out.png")
    assert result.returncode == 0, result.stderr
    assert "dropped: 'zebra giraffe'" in result.stderr  # the dropped end quoted, not the whole prompt
    assert main(["sdedit", "--image", str(tmp_path / "upright.png"), *common, "--out", str(tmp_path / "ref.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "phone-out.png"), pixels(tmp_path / "ref.png"))  # exact: same input

    Image.new("RGB", (100, 75)).save(tmp_path / "odd.png")
    fails(editlab("sdedit", "--image", tmp_path / "odd.png", "--prompt", CAPTION, "--out", tmp_path / "x.png"),
          "100x75", "--width 100 --height 72")
    for option in ("--height", "--width"):
        fails_in_process(capsys, ["generate", "--prompt", CAPTION, option, "0", "--out", tmp_path / "x.png"],
                         f"{option} 0: give a positive number")
    # a P2P word beyond CLIP's 75 tokens cannot be swapped: an error, not a silent no-op
    fails_in_process(capsys, ["p2p", "--prompt", long_prompt, "--edit", long_prompt.replace("zebra", "horse"),
                              "--steps", "2", "--out", tmp_path / "p"], "'zebra' lies beyond the 75 tokens")


# ------------------------------------------------------------------------------------------------ finding 8


def test_8_outputs_are_consistent(tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert editlab("convert", TOY_WEIGHTS, first).returncode == 0
    assert editlab("convert", TOY_WEIGHTS, second).returncode == 0
    assert first.read_bytes() == second.read_bytes()  # metadata in sorted order: identical runs, identical bytes
    fails_in_process(capsys, ["convert", TOY_WEIGHTS, first], "exists", "--force")
    assert main(["convert", str(TOY_WEIGHTS), str(first), "--force"]) == 0
    fails_in_process(capsys, ["convert", TOY_WEIGHTS, tmp_path / "x.ckpt"], "name the output", "x.safetensors")
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "vae.safetensors").write_bytes(b"earlier run")
    fails_in_process(capsys, ["train-toy", "--out", tmp_path / "toy", "--stage", "vae"], "--resume", "--force")

    # a write killed mid-way left a hidden temporary file: the next write of that file removes it
    out = tmp_path / "p2p"
    out.mkdir()
    stale = out / ".source.png.999999999.abc123.tmp"  # no such process id
    stale.write_bytes(b"half a PNG")
    common = ["--prompt", CAPTION, "--steps", "2"]
    assert main(["p2p", *common, "--edit", "a red square on a blue background", "--edit",
                 "a red triangle on a blue background", "--out", str(out)]) == 0
    assert not stale.exists()
    assert (out / "edited-2.png").exists()
    # --force into the folder of a run with more edits leaves no file of the old run
    assert main(["p2p", *common, "--edit", "a red square on a blue background", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention-edited.png", "attention-source.png", "edited.png",
                                                     "source.png"]

    # the demo records each file's own method: the DDPM PNG its scheduler and eta
    result = editlab("demo", "--steps", 4, "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    ddpm = read_parameters(tmp_path / "demo" / "3-ddpm-edited.png")
    generated = read_parameters(tmp_path / "demo" / "1-generated.png")
    assert (ddpm["scheduler"], ddpm["eta"], ddpm["steps"]) == ("ddpm", 1.0, 50)
    assert (generated["scheduler"], generated["eta"], generated["steps"]) == ("ddim", 0.0, 4)
    assert read_parameters(tmp_path / "demo" / "3-ddpm-input.png")["command"] == "demo"


# ------------------------------------------------------------------------------------------------ finding 9


def test_9_threads_are_an_option_of_every_command_and_recorded_with_the_batch(tmp_path):
    result = editlab("generate", "--prompt", CAPTION, "--threads", 2, "--batch", 2, "--steps", 2,
                     "--out", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr
    params = read_parameters(tmp_path / "g-1.png")
    assert params["threads"] == 2 and params["batch"] == 2 and params["batch_index"] == 1
    from editing.checks import default_threads, usable_cores

    assert default_threads() == max(1, usable_cores() // 2)
    fails(editlab("sdedit", "--threads", 0, "--image", "x.png", "--prompt", CAPTION, "--out", tmp_path / "x.png"),
          "--threads 0")
