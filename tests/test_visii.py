"""inversion.visii on tiny_sd1(8) with a tiny open_clip CLIP: the loss formula against a hand computation,
training (only positions 1 … eos−1 move, loss falls, exact resume), hybrid instructions, and the
`editlab visii` -> `editlab ip2p --instruction-embedding` command-line round trip.

The semantic test (an instruction learned from one colour change, applied to another shape, on the bundled
toy InstructPix2Pix model) is in tests/test_toy_instruct.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from editing.cli import main
from editing.instruct_pix2pix.editor import EditConfig, apply_instruction, load_instruction_embedding
from inversion.embedding_optimiser import EmbeddingConfig
from inversion.visii import (VisiiConfig, end_position, hybrid_instruction, instruction_eos, text_direction,
                             train_visii, visii_loss, visii_training)
from ldm.config import tiny_sd1
from ldm.images import save_png
from ldm.model import StableDiffusion
TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_CLIP).eval()


def tiny_ip2p(seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    return StableDiffusion(tiny_sd1(8)).eval()


def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A 16×16 "red square" before and the same square turned blue after."""
    before = torch.full((1, 3, 16, 16), 0.2)
    before[0, :, 4:12, 4:12] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    after = before.clone()
    after[0, :, 4:12, 4:12] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)
    return before, after


def test_loss_matches_a_hand_computation():
    eps_hat = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    eps = torch.tensor([[[[1.0, -1.0], [0.0, 0.5]]]])
    mse = (0.5 ** 2 + 0 + 2.0 ** 2 + 0.5 ** 2) / 4  # = 1.125
    image_dir = torch.tensor([1.0, 0.0, 0.0])
    for text_dir, cos in [(torch.tensor([0.0, 1.0, 0.0]), 0.0), (torch.tensor([-3.0, 4.0, 0.0]), -0.6),
                          (torch.tensor([4.0, 3.0, 0.0]), 0.5)]:  # the last one is 0.8, clamped to 0.5
        expected = 4 * mse - 0.1 * cos
        assert visii_loss(eps_hat, eps, image_dir, text_dir).item() == pytest.approx(expected, abs=1e-6)
    text_dir = torch.tensor([4.0, 3.0, 0.0], requires_grad=True)
    visii_loss(eps_hat, eps, image_dir, text_dir).backward()
    assert torch.all(text_dir.grad == 0)  # above the clamp the CLIP term gives no gradient

    hidden = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # 2 "positions": mean = [2, 1]
    projection = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -2.0]])  # [2, 1] @ P = [2, 2, 0]
    expected = torch.tensor([2.0, 2.0, 0.0]) / 8 ** 0.5
    assert torch.allclose(text_direction(hidden, projection), expected, atol=1e-7)


TRAIN = visii_training(steps=12, lr=2e-2, seed=4, checkpoint_every=4)


def test_training_moves_only_the_instruction_positions_and_resumes_exactly(tmp_path):
    model, clip = tiny_ip2p(), tiny_clip()
    before, after = pair()
    prompt = "make it blue"
    result = train_visii(model, clip, before, after, prompt, train=TRAIN, progress=False)
    eos = end_position(model, prompt)
    assert result.eos == eos == 4
    initial = model.encode_prompt([prompt])[0]
    changed = (result.run.final - initial).abs().amax(dim=1) > 0  # [77]
    assert changed[1:eos].all() and not changed[:1].any() and not changed[eos:].any()
    assert torch.equal(result.instruction[eos:], initial[eos:])

    train_visii(tiny_ip2p(), tiny_clip(), before, after, prompt, train=TRAIN, checkpoint=tmp_path / "c.pt",
                stop_at=5, progress=False)
    resumed = train_visii(tiny_ip2p(), tiny_clip(), before, after, prompt, train=TRAIN,
                          checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    assert torch.equal(resumed.run.final, result.run.final) and resumed.run.losses == result.run.losses
    with pytest.raises(ValueError, match="another initial embedding"):
        train_visii(tiny_ip2p(), tiny_clip(), before, after, "make it red", train=TRAIN,
                    checkpoint=tmp_path / "c.pt", resume=True, progress=False)


def test_loss_falls():
    model, clip = tiny_ip2p(), tiny_clip()
    before, after = pair()
    # the same timestep and noise every step (one-timestep "permutation"): the loss must go down
    train = EmbeddingConfig(steps=25, lr=5e-2, timesteps="permutation", num_train_timesteps=1, seed=0)
    cfg = VisiiConfig(clip_weight=0.0)
    losses = train_visii(model, clip, before, after, "make it blue", cfg, train, progress=False).run.losses
    assert losses[-1] < 0.8 * losses[0]


def test_bad_inputs_are_refused():
    model, before, after = tiny_ip2p(), *pair()
    import open_clip

    wide = open_clip.model.CLIP(**{**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "width": 64}})
    with pytest.raises(ValueError, match="text projection takes width 64"):
        train_visii(model, wide, before, after, "make it blue", progress=False)
    with pytest.raises(ValueError, match="init prompt is empty"):
        train_visii(model, tiny_clip(), before, after, "", progress=False)


def test_hybrid_instruction_pastes_the_extra_text_after_the_instruction():
    model = tiny_ip2p()
    learned = torch.randn(77, 32, generator=torch.Generator().manual_seed(0))
    hybrid = hybrid_instruction(model, learned, eos=4, extra_text="a husky dog")
    extra = model.encode_prompt(["a husky dog"])[0]
    n = end_position(model, "a husky dog")  # BOS + 3 words = 4 positions
    assert torch.equal(hybrid[6:6 + n], extra[:n])  # from eos + 2 (the reference's offset)
    assert torch.equal(hybrid[:6], learned[:6]) and torch.equal(hybrid[6 + n:], learned[6 + n:])
    with pytest.raises(ValueError, match="does not fit"):
        hybrid_instruction(model, learned, eos=72, extra_text="a husky dog")  # 74 + 4 > 77
    edited = apply_instruction(model, torch.rand(1, 3, 16, 16), learned, EditConfig(steps=2), "a husky dog", 4,
                               progress=False)
    plain = apply_instruction(model, torch.rand(1, 3, 16, 16), learned, EditConfig(steps=2), progress=False)
    assert edited.shape == plain.shape == (1, 4, 8, 8) and not torch.equal(edited, plain)


def test_command_line_round_trip(tmp_path, capsys):
    model, clip = tiny_ip2p(), tiny_clip()
    model.save(tmp_path / "ip2p.safetensors")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    before, after = pair()
    save_png(tmp_path / "before.png", before[0], {})
    save_png(tmp_path / "after.png", after[0], {})
    common = ["visii", "--weights", str(tmp_path / "ip2p.safetensors"), "--clip", str(tmp_path / "clip.safetensors"),
              "--clip-config", str(tmp_path / "clip.json"), "--before", str(tmp_path / "before.png"),
              "--after", str(tmp_path / "after.png"), "--size", "16", "--steps", "4", "--init", "make it blue",
              "--out", str(tmp_path / "run")]
    assert main(common) == 0
    path = tmp_path / "run" / "instruction.safetensors"
    learned = load_instruction_embedding(path)
    assert learned.shape == (77, 32) and instruction_eos(path) == 4
    assert main(["ip2p", "--weights", str(tmp_path / "ip2p.safetensors"), "--image", str(tmp_path / "before.png"),
                 "--instruction-embedding", str(path), "--steps", "2", "--keep-size",
                 "--out", str(tmp_path / "edited.png")]) == 0
    assert (tmp_path / "edited.png").is_file()
    assert main(common) == 2  # the folder holds a finished run: refused without --force or --resume
    assert "exists" in capsys.readouterr().err


KILLABLE = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import ldm.training
from editing.cli import main
torch.set_num_threads(1)
step = ldm.training.Trainer.train_step
ldm.training.Trainer.train_step = lambda self: (time.sleep(0.05), step(self))[1]  # time to kill it; same numbers
sys.exit(main(sys.argv[1:]))
"""


def test_cli_killed_with_sigkill_then_resumed_equals_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from ldm.training import load_checkpoint

    tiny_ip2p().save(tmp_path / "ip2p.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    before, after = pair()
    save_png(tmp_path / "before.png", before[0], {})
    save_png(tmp_path / "after.png", after[0], {})
    argv = lambda out: ["visii", "--weights", str(tmp_path / "ip2p.safetensors"), "--clip",
                        str(tmp_path / "clip.safetensors"), "--clip-config", str(tmp_path / "clip.json"), "--before",
                        str(tmp_path / "before.png"), "--after", str(tmp_path / "after.png"), "--size", "16",
                        "--steps", "16", "--lr", "1e-2", "--out", str(tmp_path / out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "killable.py").write_text(KILLABLE.format(root=root))
    process = subprocess.Popen([sys.executable, str(tmp_path / "killable.py"), *argv("killed")],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < load_checkpoint(checkpoint)["step"] < 16  # killed mid-run (checkpoints every 4 steps)
    assert not (tmp_path / "killed" / "instruction.safetensors").exists()

    assert main(argv("killed") + ["--resume"]) == 0
    assert main(argv("straight")) == 0
    resumed, straight = (load_file(str(tmp_path / d / "instruction.safetensors")) for d in ("killed", "straight"))
    assert torch.equal(resumed["instruction_embedding"], straight["instruction_embedding"])
    ends = [load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("killed", "straight")]
    assert ends[0]["losses"] == ends[1]["losses"] and torch.equal(ends[0]["model"]["value"], ends[1]["model"]["value"])


def test_pez_init_search_starts_from_the_found_prompt(tmp_path):
    from safetensors import safe_open

    from inversion.pez import PezConfig
    from inversion.visii import search_init_prompt

    model, clip, search_clip = tiny_ip2p(), tiny_clip(), tiny_clip(seed=5)
    before, after = pair()
    search = PezConfig(length=3, steps=15, seed=2)
    train = visii_training(steps=3, lr=2e-2, seed=4, checkpoint_every=3)
    result = train_visii(model, clip, before, after, None, train=train, progress=False, init_search=search,
                         search_clip=search_clip)
    expected = search_init_prompt(search_clip, after, search, progress=False)  # PEZ on the AFTER image alone
    assert result.init_prompt == result.search.text == expected.text and result.search.token_ids == expected.token_ids
    assert search_init_prompt(clip, after, search, progress=False).token_ids != expected.token_ids  # CLIP matters
    eos = end_position(model, result.init_prompt)
    assert result.eos == eos >= 2
    initial = model.encode_prompt([result.init_prompt])[0]
    assert torch.equal(result.run.final[eos:], initial[eos:]) and not torch.equal(result.run.final, initial)
    with pytest.raises(ValueError, match="not both"):
        train_visii(model, clip, before, after, "make it blue", train=train, progress=False, init_search=search)

    model.save(tmp_path / "ip2p.safetensors")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    save_png(tmp_path / "before.png", before[0], {})
    save_png(tmp_path / "after.png", after[0], {})
    assert main(["visii", "--weights", str(tmp_path / "ip2p.safetensors"), "--clip", str(tmp_path / "clip.safetensors"),
                 "--clip-config", str(tmp_path / "clip.json"), "--before", str(tmp_path / "before.png"),
                 "--after", str(tmp_path / "after.png"), "--size", "16", "--steps", "2", "--init-search",
                 "--search-steps", "15", "--search-length", "3", "--seed", "2", "--out", str(tmp_path / "run")]) == 0
    with safe_open(str(tmp_path / "run" / "instruction.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    from editing.commands.visii import _image

    found = search_init_prompt(clip, _image(tmp_path / "after.png", 16), search, progress=False)  # as the CLI reads it
    assert metadata["init_search"] == "pez" and metadata["init"] == found.text
    assert float(metadata["search_similarity"]) == pytest.approx(found.similarity, abs=1e-5)
