"""InstructPix2Pix training (editing/instruct_pix2pix/train.py), its toy pair recipe (editing/instruct_pix2pix/data.py)
and the ``editlab train-ip2p`` command, on tiny models: a run killed with SIGKILL resumes to the same bits, and a
2-process torchrun (DDP, gloo) equals one process with the doubled batch."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from editing.cli import main
from editing.instruct_pix2pix.data import PairFolder, ToyEditPairs
from editing.instruct_pix2pix.train import IP2PTrainConfig, conditioning_dropout, ip2p_loss, train_ip2p, widen_conv_in
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion, metadata_of
from ldm.toy.readers import read_attributes
from ldm.stream import StreamLoader
from ldm.training import TrainConfig, load_checkpoint, step_generator
from tests.peers import randomize_
# Runs ``editlab train-ip2p ARGS`` but, on reaching step HOLD_AT (the steps before it done, the last
# checkpoint older), writes MARKER and sleeps until the test kills it.
HOLDING_SCRIPT = """
import sys, time
from pathlib import Path
import ldm.training
from editing.cli import main

hold_at, marker, train_step = int(sys.argv[1]), Path(sys.argv[2]), ldm.training.Trainer.train_step

def train_step_or_hold(trainer):
    if trainer.step == hold_at:
        marker.write_text(str(trainer.step))
        time.sleep(900)
    return train_step(trainer)

ldm.training.Trainer.train_step = train_step_or_hold
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def base():
    return randomize_(StableDiffusion(tiny_sd1()), seed=5).eval()


@torch.no_grad()
def test_widened_model_starts_as_the_text_to_image_model(base):
    wide = widen_conv_in(base)
    assert wide.config.unet.in_channels == 8 and wide.config.family == "ip2p"
    assert base.config.unet.in_channels == 4  # the base model is untouched
    weight = wide.unet.conv_in.weight
    assert torch.equal(weight[:, :4], base.unet.conv_in.weight) and not weight[:, 4:].any()
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    widened, plain = wide.unet(torch.cat([x, image], 1), 500, context), base.unet(x, 500, context)
    # the zero weights add exact zeros, but a convolution over 8 input channels may sum in another order than over 4
    assert (widened - plain).abs().max() <= 1e-5 * plain.abs().max()
    with pytest.raises(ValueError, match="already takes 8 input channels"):
        widen_conv_in(wide)


def test_conditioning_dropout_rates():
    drop_text, drop_image = conditioning_dropout(200_000, torch.Generator().manual_seed(0), p=0.05)
    text_only, both, image_only = ((drop_text & ~drop_image).float().mean(), (drop_text & drop_image).float().mean(),
                                   (~drop_text & drop_image).float().mean())
    for rate in (text_only, both, image_only):
        assert abs(rate.item() - 0.05) < 0.002
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))  # one uniform per sample, the same draw
    assert torch.equal(drop_text, r < 0.1) and torch.equal(drop_image, (r >= 0.05) & (r < 0.15))


def test_toy_pairs_are_reproducible_and_their_instructions_are_true():
    pairs = ToyEditPairs(30, seed=3, size=64)
    first = pairs[7]
    assert torch.equal(first["before"], pairs[7]["before"]) and first["instruction"] == pairs[7]["instruction"]
    kinds = set()
    for i in range(len(pairs)):
        item = pairs[i]
        before, after = (read_attributes(item[k].permute(1, 2, 0).numpy()) for k in ("before", "after"))
        words = item["instruction"].split()
        if words[:3] == ["make", "the", "background"]:
            kinds.add("background")
            assert after["background"] == words[3] and after["colour"] == before["colour"]
        elif words[0] == "turn":  # "turn the circle into a square"
            kinds.add("shape")
            assert before["shape"] == words[2] and after["shape"] == words[5] and after["colour"] == before["colour"]
        else:  # "make the circle green"
            kinds.add("colour")
            assert before["shape"] == words[2] and after["colour"] == words[3]
            assert after["background"] == before["background"]
    assert kinds == {"colour", "shape", "background"}


class RecordingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []
        self.conv_in = unet.conv_in  # where StableDiffusion.device looks

    def forward(self, x, t, context):
        self.calls.append((x.clone(), context.clone()))
        return self.unet(x, t, context)


def test_loss_applies_the_dropout_to_text_and_image(base):
    model = widen_conv_in(base)
    pair = ToyEditPairs(1, seed=0, size=16)  # one pair: every streamed row is it
    loss_fn = ip2p_loss(model, StreamLoader(pair, 64, seed=0), IP2PTrainConfig(batch=64, dropout=0.3))
    model.unet = RecordingUNet(model.unet)
    loss = loss_fn(0, step_generator(0, 0))
    assert loss.ndim == 0 and loss > 0
    x, context = model.unet.calls[0]
    with torch.no_grad():
        instruction, null = model.encode_prompt([pair[0]["instruction"]]), model.encode_prompt([""])
        image_latent = model.vae.encode(pair[0]["before"][None] * 2 - 1).mean  # c_I = E(before).mode()
    text_kept = (context == instruction).flatten(1).all(1)
    text_dropped = (context == null).flatten(1).all(1)
    image_kept = ((x[:, 4:] - image_latent).abs() < 1e-5).flatten(1).all(1)  # batch 64 vs 1: rounding
    image_dropped = (x[:, 4:] == 0).flatten(1).all(1)
    assert (text_kept ^ text_dropped).all() and (image_kept ^ image_dropped).all()
    for text in (text_kept, text_dropped):  # p = 0.3: text-only r < 0.3, both 0.3-0.6, image-only 0.6-0.9
        for image in (image_kept, image_dropped):
            assert (text & image).any()


def test_training_lowers_the_loss_on_fixed_draws(base):
    model = widen_conv_in(base)
    dataset = ToyEditPairs(4, seed=1, size=16)
    cfg = IP2PTrainConfig(batch=4)
    evaluate = lambda m: sum(ip2p_loss(m, StreamLoader(dataset, 4, 99), cfg)(s, step_generator(99, s)).item()
                             for s in range(4)) / 4
    with torch.no_grad():
        before = evaluate(model)
    model, losses = train_ip2p(model, dataset, TrainConfig(steps=15, lr=2e-3, final_lr_fraction=1.0), cfg, progress=False)
    assert len(losses) == 15 and not model.vae.encoder.conv_in.weight.requires_grad
    with torch.no_grad():
        assert evaluate(model) < 0.8 * before


def test_train_command_writes_an_editable_model(base, tmp_path):
    base.save(tmp_path / "base.safetensors")
    out = tmp_path / "ip2p.safetensors"
    args = ["train-ip2p", "--weights", str(tmp_path / "base.safetensors"), "--size", "16", "--pairs", "6",
            "--steps", "2", "--batch", "2", "--out", str(out)]
    assert main(args) == 0
    model = StableDiffusion.load(out)
    assert model.config.unet.in_channels == 8 and model.config.family == "ip2p"
    meta = metadata_of(out)
    assert meta["recipe"] == "editlab-ip2p-v1" and meta["pairs"] == "6" and meta["base"] == "base.safetensors"
    assert (tmp_path / "ip2p.ckpt.pt").is_file()
    assert main(args) == 2  # the output exists: refused without --force
    from PIL import Image
    Image.fromarray((np.asarray(ToyEditPairs(1, 0, 16)[0]["before"].permute(1, 2, 0)) * 255).astype(np.uint8)).save(
        tmp_path / "in.png")
    assert main(["ip2p", "--weights", str(out), "--image", str(tmp_path / "in.png"), "--instruction", "make the circle red",
                 "--resolution", "16", "--steps", "2", "--out", str(tmp_path / "edit.png")]) == 0


def test_pair_folder(tmp_path):
    from PIL import Image
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (40, 20), colour).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text('{"before": "a.png", "after": "b.png", "instruction": "make it blue"}\n\n')
    item = PairFolder(tmp_path, 16)[0]
    assert item["before"].shape == (3, 16, 16) and item["instruction"] == "make it blue"
    assert torch.allclose(item["after"][:, 8, 8], torch.tensor([0.0, 0.0, 1.0]))
    (tmp_path / "pairs.jsonl").write_text('{"before": "a.png"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1: not a JSON object with before, after and instruction"):
        PairFolder(tmp_path, 16)


def _command(base, tmp_path, *extra):
    base.save(tmp_path / "base.safetensors")
    return ["train-ip2p", "--weights", str(tmp_path / "base.safetensors"), "--size", "16", "--lr", "1e-3", *extra]


def test_run_killed_mid_way_resumes_to_the_uninterrupted_weights(base, tmp_path):
    args = _command(base, tmp_path, "--pairs", "6", "--steps", "6", "--batch", "2", "--checkpoint-every", "2")
    script, marker = tmp_path / "hold.py", tmp_path / "holding"
    script.write_text(HOLDING_SCRIPT)
    killed = tmp_path / "killed.safetensors"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(script), "3", str(marker), *args, "--out", str(killed)],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        deadline = time.monotonic() + 300  # generous: a shared machine can be slow to start
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # 3 steps done: the third is lost, the checkpoint holds 2
        process.wait()
    assert marker.exists(), (tmp_path / "stderr.txt").read_text()[-2000:]
    assert process.returncode == -signal.SIGKILL and not killed.exists()
    assert load_checkpoint(tmp_path / "killed.ckpt.pt")["step"] == 2

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole.safetensors")]) == 0
    resumed, whole = load_checkpoint(tmp_path / "killed.ckpt.pt"), load_checkpoint(tmp_path / "whole.ckpt.pt")
    assert resumed["step"] == whole["step"] == 6 and resumed["losses"] == whole["losses"]
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for name, value in whole["ema"]["shadow"].items():
        assert torch.equal(value, resumed["ema"]["shadow"][name]), name
    saved, straight = load_file(str(killed)), load_file(str(tmp_path / "whole.safetensors"))  # EMA weights
    assert saved.keys() == straight.keys() and all(torch.equal(v, saved[k]) for k, v in straight.items())
    start = widen_conv_in(base).unet.state_dict()
    assert not torch.equal(whole["model"]["conv_in.weight"], start["conv_in.weight"])  # it did train


def test_two_process_torchrun_equals_one_process_with_the_doubled_batch(base, tmp_path):
    common = _command(base, tmp_path, "--pairs", "4", "--steps", "2")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "editing.cli", *common, "--batch", "1", "--out", str(tmp_path / "ddp.safetensors")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert metadata_of(tmp_path / "ddp.safetensors")["processes"] == "2"
    assert main([*common, "--batch", "2", "--out", str(tmp_path / "one.safetensors")]) == 0
    ddp = load_checkpoint(tmp_path / "ddp.ckpt.pt")["model"]  # the UNet's weights, not their EMA
    one = load_checkpoint(tmp_path / "one.ckpt.pt")["model"]
    start = widen_conv_in(base).unet.state_dict()
    assert ddp.keys() == one.keys() == start.keys()
    step_ddp = torch.cat([(ddp[k] - start[k]).flatten() for k in start])
    step_one = torch.cat([(one[k] - start[k]).flatten() for k in start])
    assert step_one.norm() > 0
    # Adam's first steps are ±lr wherever a gradient is ~0 in float noise, so compare whole updates
    assert (step_ddp - step_one).norm() / step_one.norm() < 1e-2  # measured 1.1e-3; batch 1 alone: 1.4
