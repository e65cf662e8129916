"""The toy world complete from the command line (issue 22, finding 2): visii, style and make-pairs --filter
clip run on the bundled toy model with no other file (the toy CLIP and toy IP-Adapter are the defaults), and
the README's Visii toy result comes out of `editlab visii` itself. Run as subprocesses, as a user would."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from editing.instruct_pix2pix.editor import apply_instruction, load_instruction_embedding
from editing.options import TOY_CLIP_WEIGHTS, TOY_IP2P_WEIGHTS, TOY_IP_ADAPTER_WEIGHTS
from ldm.images import read_parameters
from ldm.model import StableDiffusion, metadata_of
from ldm.toy import ShapeSpec, object_mask, read_colour, render

pytestmark = pytest.mark.skipif(not (TOY_CLIP_WEIGHTS.is_file() and TOY_IP_ADAPTER_WEIGHTS.is_file()),
                                reason="toy CLIP / IP-Adapter weights not built")
SIZE = dict(size=0.42, center=(0.5, 0.5))


def editlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the suite (and the README's measurements)
    return subprocess.run([sys.executable, "-m", "editing.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def png(path, spec: ShapeSpec):
    Image.fromarray(render(spec)[0]).save(path)
    return path


def colour_of(path) -> str | None:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    return read_colour(rgb, object_mask(rgb))


def test_style_runs_on_the_toy_with_no_other_file(tmp_path):
    style = png(tmp_path / "style.png", ShapeSpec("square", "green", "white", **SIZE))
    out = tmp_path / "styled.png"
    done = editlab("style", "--style-image", style, "--prompt", "", "--steps", 20, "--out", out)
    assert done.returncode == 0, done.stderr
    params = read_parameters(out)
    assert params["ip_adapter"] == TOY_IP_ADAPTER_WEIGHTS.name and params["image_encoder"] == TOY_CLIP_WEIGHTS.name
    assert colour_of(out) == "green"  # the style image's colour (scale 1, the image prompt alone)


def test_style_and_visii_name_the_missing_file_for_a_non_toy_model(weights, tmp_path):
    style = png(tmp_path / "style.png", ShapeSpec("square", "green", "white", **SIZE))
    done = editlab("style", "--weights", weights, "--style-image", style, "--prompt", "x", "--out", tmp_path / "o.png")
    assert done.returncode == 2 and "--ip-adapter" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    from ldm.config import tiny_sd1
    from ldm.model import StableDiffusion

    editor = tmp_path / "tiny-ip2p.safetensors"  # visii needs an 8-channel editor (the model check comes first)
    StableDiffusion(tiny_sd1(8)).save(editor)
    done = editlab("visii", "--weights", editor, "--before", style, "--after", style, "--out", tmp_path / "v")
    assert done.returncode == 2 and "--clip" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_make_pairs_clip_filter_runs_on_the_toy(tmp_path):
    done = editlab("make-pairs", "--toy-captions", 1, "--filter", "clip", "--samples", 2, "--keep", 1,
                   "--steps", 6, "--scheduler", "ddim", "--out", tmp_path / "pairs")
    assert done.returncode in (0, 1), done.stderr  # 1: no sample passed the filters, which is not an error
    samples = [json.loads(line) for line in (tmp_path / "pairs" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    assert all(-1 <= s["image_image"] <= 1 and -1 <= s["direction"] <= 1 for s in samples), samples


def test_visii_from_the_cli_reproduces_the_readme_toy_result(tmp_path):
    """`editlab visii` with no --clip (the toy CLIP, the paper's CLIP weight 0.1) on one red -> green circle;
    the instruction it writes turns a blue square green in 10 of 10 seeds, read as tests/test_toy_instruct.py
    reads it (DDIM 20 steps, s_T 7.5, s_I 1.5)."""
    from tests.test_toy_instruct import EDIT, SEEDS, image_of, reads

    before = png(tmp_path / "before.png", ShapeSpec("circle", "red", "white", **SIZE))
    after = png(tmp_path / "after.png", ShapeSpec("circle", "green", "white", **SIZE))
    done = editlab("visii", "--before", before, "--after", after, "--init", "make the shape", "--lr", "1e-2",
                   "--out", tmp_path / "visii")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "visii" / "instruction.safetensors"
    meta = metadata_of(path)
    assert meta["clip"] == TOY_CLIP_WEIGHTS.name and float(meta["clip_weight"]) == 0.1
    model = StableDiffusion.load(TOY_IP2P_WEIGHTS)
    square = image_of(ShapeSpec("square", "blue", "white", **SIZE))
    latents = apply_instruction(model, square.repeat(SEEDS, 1, 1, 1), load_instruction_embedding(path), EDIT,
                                progress=False)
    outcomes = reads(model, latents)
    assert sum(colour == "green" for colour, _ in outcomes) == SEEDS, outcomes
