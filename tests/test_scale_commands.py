"""The long commands as real processes: Ctrl-C (a real SIGINT) saves and exits 130 with one line, a rerun
without --resume is refused and --resume ends with the uninterrupted run's weights; make-pairs killed with
SIGKILL resumes to the same bytes; and ONE torchrun launch (2 gloo processes) checks sharded make-pairs, the
stream's split across real ranks and workers, and 2 processes × batch 1 × accumulation 2 = 1 process × batch 4."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from editing.cli import main
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.training import load_checkpoint
from tests.peers import randomize_
from tests.test_make_pairs import files  # noqa: F401  (fixture: tiny CLIP and two caption pairs)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Runs ``editlab ARGS`` and sends itself a real SIGINT right after optimiser step K.
INTERRUPT_SCRIPT = """
import os, signal, sys
import ldm.training
from editing.cli import main

k, train_step = int(sys.argv[1]), ldm.training.Trainer.train_step

def step_then_interrupt(trainer):
    loss = train_step(trainer)
    if trainer.step == k:
        os.kill(os.getpid(), signal.SIGINT)
    return loss

ldm.training.Trainer.train_step = step_then_interrupt
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    randomize_(StableDiffusion(tiny_sd1()), 0).save(folder / "sd.safetensors")
    (folder / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (200 * i, 80, 30)).save(folder / "images" / f"{i}.png")
    return folder


def commands(tiny):
    weights = ["--weights", str(tiny / "sd.safetensors")]
    return {
        "train-ip2p": ["train-ip2p", *weights, "--size", "16", "--pairs", "4", "--steps", "4", "--batch", "2",
                       "--lr", "1e-3", "--checkpoint-every", "3"],
        "train-controlnet": ["train-controlnet", *weights, "--size", "16", "--images", "4", "--steps", "4",
                             "--batch", "2", "--lr", "1e-3", "--checkpoint-every", "3"],
        "textual-inversion": ["textual-inversion", *weights, "--images", str(tiny / "images"), "--token", "<t>",
                              "--init-word", "toy", "--size", "16", "--steps", "4", "--batch", "2"],
    }


@pytest.mark.parametrize("command", ["train-ip2p", "train-controlnet", "textual-inversion"])
def test_ctrl_c_saves_exits_130_and_resume_ends_with_the_uninterrupted_weights(tiny, tmp_path, command):
    argv = commands(tiny)[command]
    out, straight = tmp_path / "run.safetensors", tmp_path / "straight.safetensors"
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), "2", *argv, "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    checkpoint = out.with_suffix(".ckpt.pt")
    message = f"editlab {command}: interrupted at step 2; saved {checkpoint}; rerun with --resume"
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == message and "Traceback" not in done.stderr
    assert load_checkpoint(checkpoint)["step"] == 2 and not out.exists()  # saved at the step reached (not 3)

    assert main([*argv, "--out", str(out)]) == 2  # a rerun without --resume refuses to start over
    assert load_checkpoint(checkpoint)["step"] == 2
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert main([*argv, "--out", str(straight)]) == 0
    resumed, whole = load_file(str(out)), load_file(str(straight))
    assert resumed.keys() == whole.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_changed_option_on_resume_is_named(tiny, tmp_path, capsys):
    argv = [*commands(tiny)["train-ip2p"], "--out", str(tmp_path / "a.safetensors")]
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    assert subprocess.run([sys.executable, str(script), "1", *argv], env=ENV, capture_output=True,
                          timeout=300).returncode == 130
    assert main([*argv, "--resume", "--pairs", "5"]) == 2
    assert "--pairs: the checkpoint's run used 4, this run 5" in capsys.readouterr().err


def make_pairs_args(files, out, *extra):  # noqa: F811
    permissive = ["--min-image-text", "-1", "--min-image-image", "-1", "--min-direction", "-1"]
    return ["make-pairs", "--captions", str(files / "captions.jsonl"), "--clip", str(files / "clip.safetensors"),
            "--clip-config", str(files / "clip.json"), "--samples", "2", "--keep", "1", "--steps", "2", "--seed", "7",
            "--batch", "2", "--shard-size", "1", "--format", "webdataset", *permissive, "--out", str(out), *extra]


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# Under torchrun: make-pairs, then the stream over real ranks and 2 workers, then train-ip2p on the shards.
TORCHRUN_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from editing.cli import main
from ldm.stream import StreamLoader
from ldm.training import world

make_pairs, train, counts = json.loads(sys.argv[1])
assert main(make_pairs) == 0
dist.barrier()  # every shard written

class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 12
    def __getitem__(self, i):
        return {"x": torch.tensor([i])}

rank, size = world()
loader = StreamLoader(Numbers(), 3, seed=0, workers=2)  # G = 6: two steps are one epoch
seen = [(i, w) for step in range(2) for i, w in zip(*(lambda b: (b["_index"], b["_worker"]))(loader.batch(step)))]
loader.close()
open(f"{counts}.{rank}", "w").write(json.dumps(seen))
sys.exit(main(train))
"""


def test_torchrun_make_pairs_stream_and_accumulation(files, tiny, tmp_path):  # noqa: F811
    ddp_pairs, one_pairs = tmp_path / "ddp-pairs", tmp_path / "one-pairs"
    train = ["train-ip2p", "--weights", str(tiny / "sd.safetensors"), "--data", str(ddp_pairs), "--size", "16",
             "--steps", "2", "--lr", "1e-3"]
    script = tmp_path / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    plan = [make_pairs_args(files, ddp_pairs), [*train, "--batch", "1", "--accumulate", "2", "--out",
                                                str(tmp_path / "ddp.safetensors")], str(tmp_path / "counts")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(plan)], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # sharded make-pairs = one process, byte for byte (both shards, both lists)
    assert main(make_pairs_args(files, one_pairs)) == 0
    ddp_files, one_files = folder_bytes(ddp_pairs), folder_bytes(one_pairs)
    assert sorted(one_files) == ["pairs-000000.tar", "pairs-000001.tar", "pairs.jsonl", "samples.jsonl"]
    assert ddp_files == one_files and len(one_files["pairs.jsonl"].splitlines()) == 2

    # the stream: each of the 12 samples once across 2 ranks x 2 workers
    seen = [tuple(x) for r in (0, 1) for x in json.loads((tmp_path / f"counts.{r}").read_text())]
    assert sorted(i for i, _ in seen) == list(range(12)) and {w for _, w in seen} == {0, 1}

    # 2 processes x batch 1 x accumulation 2 = 1 process x batch 4
    assert main([*train, "--batch", "4", "--out", str(tmp_path / "one.safetensors")]) == 0
    ddp = load_checkpoint(tmp_path / "ddp.ckpt.pt")["model"]
    one = load_checkpoint(tmp_path / "one.ckpt.pt")["model"]
    base = StableDiffusion.load(tiny / "sd.safetensors").unet.state_dict()  # conv_in is widened: left out
    step_ddp = torch.cat([(ddp[k] - base.get(k, ddp[k] * 0)).flatten() for k in ddp if k != "conv_in.weight"])
    step_one = torch.cat([(one[k] - base.get(k, one[k] * 0)).flatten() for k in one if k != "conv_in.weight"])
    assert step_one.norm() > 0
    # Adam's first steps are ±lr wherever a gradient is ~0 in float noise, so compare whole updates
    assert (step_ddp - step_one).norm() / step_one.norm() < 1e-2


HOLD_SCRIPT = """
import sys, time
from pathlib import Path
import editing.instruct_pix2pix.pair_runs
from editing.cli import main

marker, record = Path(sys.argv[1]), editing.instruct_pix2pix.pair_runs.PairRun.record

def record_then_hold(self, shard, entry):
    record(self, shard, entry)
    marker.write_text("recorded")
    time.sleep(900)

editing.instruct_pix2pix.pair_runs.PairRun.record = record_then_hold
sys.exit(main(sys.argv[2:]))
"""


def test_make_pairs_killed_and_resumed_makes_the_same_bytes(files, tmp_path, capsys):  # noqa: F811
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    script, marker = tmp_path / "hold.py", tmp_path / "recorded"
    script.write_text(HOLD_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(marker), *make_pairs_args(files, killed)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # one caption pair recorded, its shard not yet packed
    process.wait()
    assert marker.exists(), process.stderr.read()[-2000:]
    assert not (killed / "pairs.jsonl").exists() and not (killed / "pairs-000000.tar").exists()

    assert main(make_pairs_args(files, killed)) == 2  # without --resume: refused
    assert "unfinished make-pairs run" in capsys.readouterr().err
    assert main(make_pairs_args(files, killed, "--resume")) == 0
    assert "caption pair 0" not in capsys.readouterr().out  # the recorded pair was not rendered again
    assert main(make_pairs_args(files, whole)) == 0
    assert folder_bytes(killed) == folder_bytes(whole)
    assert not list((killed / ".progress").glob("shard-*/"))  # staged images removed once packed


@pytest.mark.parametrize("command", ["visii", "train-toy"])
def test_ctrl_c_in_the_folder_commands(tmp_path, command):
    """The same contract for the commands that write a folder: Visii (toy editor and toy CLIP) and the toy
    model's VAE stage."""
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("before", (200, 40, 40)), ("after", (40, 200, 40))):
        Image.new("RGB", (64, 64), colour).save(images / f"{name}.png")
    argv, checkpoint_name, result = {
        "visii": (["visii", "--before", str(images / "before.png"), "--after", str(images / "after.png"),
                   "--steps", "4"], "checkpoint.pt", "instruction.safetensors"),
        "train-toy": (["train-toy", "--stage", "vae", "--vae-steps", "4"], "vae-checkpoint.pt", "vae.safetensors"),
    }[command]
    out, straight = tmp_path / "run", tmp_path / "straight"
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), "2", *argv, "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    checkpoint = out / checkpoint_name
    assert done.returncode == 130, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"editlab {command}: interrupted at step 2; saved ") and last.endswith(
        "; rerun with --resume") and "Traceback" not in done.stderr
    assert load_checkpoint(checkpoint)["step"] == 2 and not (out / result).exists()
    assert main([*argv, "--out", str(out)]) == 2  # a rerun without --resume refuses to start over
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert main([*argv, "--out", str(straight)]) == 0
    resumed, whole = load_file(str(out / result)), load_file(str(straight / result))
    assert resumed.keys() == whole.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
