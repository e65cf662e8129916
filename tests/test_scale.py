"""Training at scale, in one process: gradient accumulation, EMA, gradient checkpointing, mixed precision, the
streaming order (each sample once per epoch across ranks and workers), shards (corrupt and truncated ones
skipped and counted), exact resume of streamed batches, and the recorded options. The multi-process checks
run under torchrun in test_scale_torchrun.py."""

import dataclasses
import io
import json
import logging

import pytest
import torch
from PIL import Image
from torch import nn

from controls import ControlNet
from controls.train import ControlledUNet
from editing.cli import main
from editing.instruct_pix2pix.data import PairShards
from ldm.config import tiny_sd1
from ldm.interrupt import check_fresh_start
from ldm.model import StableDiffusion
from ldm.shards import index_shards, list_shards, write_shard
from ldm.stream import CorruptSample, StreamLoader
from ldm.training import Part, TrainConfig, Trainer, enable_gradient_checkpointing
from tests.peers import randomize_


class Numbers(torch.utils.data.Dataset):
    """Sample i is {"x": [i]}; ``bad`` indices raise CorruptSample."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise CorruptSample(f"sample {i}")
        return {"x": torch.tensor([float(i)])}


def test_each_sample_is_read_once_per_epoch_across_ranks_and_workers():
    n, batch, accumulate, ranks = 24, 3, 2, 2  # G = 12: two steps are one epoch
    seen, workers = [], set()
    for rank in range(ranks):
        loader = StreamLoader(Numbers(n), batch, seed=4, accumulate=accumulate, workers=2, rank_and_size=(rank, ranks))
        for step in range(2):
            for micro in range(accumulate):
                out = loader.batch(step, Part(micro * ranks + rank, ranks * accumulate))
                seen += out["_index"]
                workers.update(out["_worker"])
        loader.close()
    assert sorted(seen) == list(range(n)) and workers == {0, 1}  # once each; both workers read
    # the order does not depend on the split: one process with the global batch reads the same samples per step
    one = StreamLoader(Numbers(n), batch * ranks * accumulate, seed=4)
    assert sorted(one.batch(0)["_index"]) == sorted(seen[:batch * 2] + seen[batch * 4:batch * 6])
    assert sorted(one.batch(1)["_index"]) != sorted(one.batch(0)["_index"])


def regression(seed=0, log=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    loader = StreamLoader(Numbers(40), 4, seed=1)

    def loss_fn(step, generator, part=Part()):
        n, mine = part.rows(4)
        x = loader.batch(step, part)["x"] / 40
        noise = torch.randn(n, 1, generator=generator)[mine]
        if log is not None:
            log.append((step, x.flatten().tolist()))
        return ((model(x) - torch.sin(3 * x) - 0.1 * noise) ** 2).mean()

    return model, loss_fn


CFG = TrainConfig(steps=8, lr=1e-2, ema_decay=0.9, seed=3, checkpoint_every=3)


def test_a_resumed_streaming_run_reads_the_same_batches_and_losses(tmp_path):
    straight_log, resumed_log = [], []
    model, loss_fn = regression(log=straight_log)
    straight = Trainer(model, loss_fn, CFG, tmp_path / "a.pt").run(progress=False)
    Trainer(*regression(log=resumed_log), CFG, tmp_path / "b.pt").run(stop_at=5, progress=False)
    with pytest.raises(FileExistsError, match="unfinished run .step 5 of 8.*--resume.*--force"):
        check_fresh_start(tmp_path / "b.pt", resume=False, force=False)
    again, loss_again = regression(seed=9, log=resumed_log)  # a new process: a new loader starts at step 5
    resumed = Trainer(again, loss_again, CFG, tmp_path / "b.pt").run(resume=True, progress=False)
    assert resumed == straight and resumed_log == straight_log
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_accumulation_equals_the_larger_batch():
    def gradients(batch, accumulate):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

        def loss_fn(step, generator, part):
            n, mine = part.rows(batch)
            x = torch.randn(n, 3, generator=generator)[mine]
            return (model(x) ** 2).mean()

        cfg = TrainConfig(steps=1, lr=0.1, grad_clip=None, accumulate=accumulate)
        trainer = Trainer(model, loss_fn, cfg)
        trainer.optimizer.step = lambda *a, **k: None  # keep the gradients of step 0, skip the update
        trainer.train_step()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(gradients(2, 4), gradients(8, 1)):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)  # (1/A)·Σ mean over parts = the mean: fp32 rounding only


def test_ema_weights_equal_the_recurrence_by_hand():
    model, loss_fn = regression()
    trainer = Trainer(model, loss_fn, dataclasses.replace(CFG, steps=6))
    expected = {k: v.detach().clone() for k, v in model.named_parameters()}
    for n in range(1, 7):
        trainer.train_step()
        d = min(0.9, (1 + n) / (10 + n))  # the decay warm-up of LitEma
        for k, p in model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * p.detach()  # θ̄ ← d·θ̄ + (1 − d)·θ
    final = trainer.final_model()  # what gets saved for inference
    for k, p in final.named_parameters():
        assert torch.allclose(p, expected[k], rtol=0, atol=1e-6), k  # lerp vs the formula: rounding


def test_gradient_checkpointing_leaves_the_gradients_equal():
    model = randomize_(StableDiffusion(tiny_sd1()), 0)
    net = ControlNet.from_unet(model.unet, (16, 32), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in net.parameters():  # no zero convs: every block gets a gradient
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    wrapper = ControlledUNet(model.unet, net).train()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    context, hint = torch.randn(2, 77, 32, generator=g), torch.rand(2, 3, 16, 16, generator=g)

    def grads():
        wrapper.zero_grad()
        wrapper(x, t, context, hint).square().mean().backward()
        return {k: p.grad.clone() for k, p in wrapper.named_parameters()}

    plain = grads()
    assert enable_gradient_checkpointing(wrapper) > 10
    again = grads()
    assert max((plain[k] - again[k]).abs().max().item() for k in plain) <= 1e-5
    assert all(plain[k].abs().max() > 0 for k in ("controlnet.controlnet_mid_block.weight", "unet.conv_in.weight"))


def test_bf16_and_fp16_train_with_fp32_weights_and_resume_the_scaler(tmp_path):
    for precision in ("bf16", "fp16"):
        model, loss_fn = regression()
        cfg = dataclasses.replace(CFG, precision=precision, steps=3)
        losses = Trainer(model, loss_fn, cfg, tmp_path / f"{precision}.pt").run(progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters()) and len(losses) == 3
        state = torch.load(tmp_path / f"{precision}.pt", weights_only=True)
        assert (state["scaler"].get("scale", 1) > 1) == (precision == "fp16")  # the loss scale S, fp16 only


def test_options_are_recorded_and_a_mismatch_names_the_option(tmp_path):
    model, loss_fn = regression()
    Trainer(model, loss_fn, CFG, tmp_path / "run.pt", options={"--batch": 4, "--data": "x"}).run(stop_at=2,
                                                                                              progress=False)
    other = Trainer(*regression(), CFG, tmp_path / "run.pt", options={"--batch": 8, "--data": "x"})
    with pytest.raises(ValueError, match="--batch: the checkpoint's run used 4, this run 8"):
        other.run(resume=True, progress=False)


def _png(colour, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pack_writes_shards_and_corrupt_or_truncated_ones_are_skipped(tmp_path, caplog):
    data = tmp_path / "pairs"
    data.mkdir()
    lines = []
    for k in range(5):
        (data / f"{k}a.png").write_bytes(_png((k * 40, 0, 0)))
        (data / f"{k}b.png").write_bytes(_png((0, k * 40, 0)))
        lines.append(json.dumps({"before": f"{k}a.png", "after": f"{k}b.png", "instruction": f"edit {k}"}))
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["pack", "--data", str(data), "--out", str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    shards = list_shards(tmp_path / "shards")
    assert [p.name for p in shards] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    first = PairShards(tmp_path / "shards", 8)
    assert len(first) == 5 and first[4]["instruction"] == "edit 4"
    assert torch.allclose(first[4]["before"][0], torch.full((8, 8), 160 / 255))
    assert main(["pack", "--data", str(data), "--out", str(tmp_path / "shards")]) == 2  # refuses to overwrite

    shards[1].write_bytes(shards[1].read_bytes()[:700])  # truncated in the second sample's data
    (tmp_path / "shards" / "data-000003.tar").write_bytes(b"not a tar file at all" * 40)
    write_shard(tmp_path / "shards" / "data-000004.tar", [("bad", {"before.png": b"junk", "after.png": _png(0),
                                                                 "txt": b"edit bad"})])
    with caplog.at_level(logging.WARNING):
        pairs = PairShards(tmp_path / "shards", 8)
        loader = StreamLoader(pairs, 6, seed=0)
        batch = loader.batch(0)
    assert len(pairs.index.skipped_shards) == 2 and len(pairs) == 4  # shards 0 and 2, and the bad sample
    assert "data-000001.tar" in caplog.text and "data-000003.tar" in caplog.text
    assert len(loader.skipped) == 1 and loader.skipped[0].startswith("data-000004.tar:bad: ")  # named, counted
    assert len(batch["instruction"]) == 6 and "edit bad" not in batch["instruction"]  # replaced, batch kept whole
    assert index_shards([shards[0]], ("before.png",)).samples[0].key == "000000000"


def test_a_run_removes_the_temporaries_a_killed_write_left(tmp_path):
    stale = tmp_path / ".run.pt.k3j2.tmp"  # what atomic_path leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.k3j2.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    Trainer(*regression(), dataclasses.replace(CFG, steps=1), tmp_path / "run.pt").run(progress=False)
    assert not stale.exists() and other.exists() and (tmp_path / "run.pt").is_file()
