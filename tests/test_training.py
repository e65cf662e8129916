"""ldm.training (checkpoint, resume, per-step randomness, EMA, atomic writes) and the toy recipe on tiny
configs (ldm/toy/train.py, editing/commands/train_toy.py)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import ldm.training as training
from editing.cli import build_parser, main
from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.model import StableDiffusion, metadata_of
from ldm.toy import train as toy_train
from ldm.training import EMA, Trainer, TrainConfig, learning_rate, save_checkpoint, step_generator


def regression_problem(seed: int = 0):
    """A small MLP fitting y = sin(3x) on fresh points every step, drawn from the step's generator."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))

    def loss_fn(step, generator):
        x = torch.rand(16, 1, generator=generator) * 2 - 1
        return ((model(x) - torch.sin(3 * x)) ** 2).mean()

    return model, loss_fn


CFG = TrainConfig(steps=12, lr=1e-2, warmup=3, ema_decay=0.9, seed=5, checkpoint_every=4)


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path):
    model, loss_fn = regression_problem()
    straight = Trainer(model, loss_fn, CFG, tmp_path / "straight.pt")
    straight_losses = straight.run(progress=False)

    first_model, first_loss = regression_problem()
    Trainer(first_model, first_loss, CFG, tmp_path / "run.pt").run(stop_at=7, progress=False)  # "killed"
    torch.manual_seed(123)  # the global RNG is part of the checkpoint: disturb it
    resumed_model, resumed_loss = regression_problem(seed=99)  # a new process: other initial weights
    resumed = Trainer(resumed_model, resumed_loss, CFG, tmp_path / "run.pt")
    resumed_losses = resumed.run(resume=True, progress=False)

    assert resumed.step == straight.step == 12
    assert resumed_losses == straight_losses  # the history survives the interruption
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], resumed.ema.shadow[name]), name
    assert not torch.equal(straight.final_model()[0].weight, first_model[0].weight)  # k < steps really stopped


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    model, fit = regression_problem()
    loss_fn = lambda step, generator: fit(step, generator) * (float("nan") if step == 5 else 1.0)
    trainer = Trainer(model, loss_fn, CFG, tmp_path / "run.pt")
    with pytest.raises(FloatingPointError, match="loss is nan at step 5; lower the learning rate"):
        trainer.run(progress=False)
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["step"] == 4  # the checkpoint of step 4 (checkpoint_every=4) stays; nothing after it is written
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_resume_with_other_settings_is_refused(tmp_path):
    model, loss_fn = regression_problem()
    Trainer(model, loss_fn, CFG, tmp_path / "run.pt").run(stop_at=2, progress=False)
    other = Trainer(model, loss_fn, dataclasses.replace(CFG, lr=1e-3), tmp_path / "run.pt")
    with pytest.raises(ValueError, match="other training settings"):
        other.run(resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(model, loss_fn, CFG, tmp_path / "missing.pt").run(resume=True, progress=False)


def test_processes_share_the_global_batch_and_only_rank_zero_writes(tmp_path, monkeypatch):
    """The multi-process contract without processes: world() is faked; the real 2-process runs are in
    test_controlnet_train.py and test_ip2p_train.py (torchrun, gloo)."""
    assert training.batch_share(3) == (3, slice(0, 3)) and training.world() == (0, 1)
    model, loss_fn = regression_problem()
    assert training.data_parallel(model) is model  # one process: no DDP wrapper
    barriers = []
    monkeypatch.setattr(training.dist, "barrier", lambda: barriers.append(1))
    for rank in (1, 0):
        monkeypatch.setattr(training, "world", lambda: (rank, 3))
        assert training.batch_share(2) == (6, slice(2 * rank, 2 * rank + 2))  # rows [r·batch, (r+1)·batch)
        Trainer(model, loss_fn, CFG, tmp_path / "run.pt").save()
        assert (tmp_path / "run.pt").is_file() == (rank == 0)  # rank 1 waits, rank 0 writes
    assert len(barriers) == 2


def test_step_generator_depends_only_on_seed_step_and_stream():
    draw = lambda *key: torch.rand(4, generator=step_generator(*key))
    assert torch.equal(draw(0, 3), draw(0, 3))
    for other in [(0, 4), (1, 3), (0, 3, 1)]:
        assert not torch.equal(draw(0, 3), draw(*other))


def test_learning_rate_warmup_and_cosine():
    cfg = TrainConfig(steps=101, lr=1.0, warmup=10, final_lr_fraction=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)  # (s+1)/W
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    middle = 10 + 45  # half-way through the decay: floor + (peak − floor)/2
    assert learning_rate(middle, cfg) == pytest.approx(0.55)
    assert learning_rate(100, cfg) == pytest.approx(0.1)


def test_ema_follows_the_formula():
    layer = nn.Linear(1, 1, bias=False)
    nn.init.constant_(layer.weight, 0.0)
    ema = EMA(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.update(layer)  # n = 1: d = min(0.5, 2/11) = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11)
    ema.update(layer)  # n = 2: d = min(0.5, 3/12) = 1/4
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11 * 1 / 4)


def test_interrupted_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"step": 1})

    def crash_midway(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new.pt", {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary file, no new.pt
    assert training.load_checkpoint(path) == {"step": 1}


def tiny_toy_config() -> ModelConfig:
    """The toy layout (3-level VAE, factor 4; UNet with attention at two levels) at a few channels."""
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2), attention_levels=(True, False), layers_per_level=1,
                      n_heads=2, context_dim=16, norm_groups=8)
    vae = VAEConfig(block_channels=(8, 8, 16), layers_per_level=1, norm_groups=4, scaling_factor=1.0)
    text = TextEncoderConfig(width=16, n_layers=1, n_heads=2, mlp_dim=32)
    return ModelConfig(unet=unet, vae=vae, text=text, family="toy")


@torch.no_grad()
def reconstruction_error(model, images):
    x = toy_train.to_model_range(images)
    return (model.vae.decode(model.vae.encode(x).mode()) - x).abs().mean().item()


@torch.no_grad()
def held_out_diffusion_loss(model, recipe, images, captions):
    means, stds = toy_train.encode_pool(model, images)
    loss_fn = toy_train.diffusion_loss(model, means, stds, captions, recipe)
    return sum(loss_fn(0, step_generator(1000, k)).item() for k in range(4)) / 4  # draws no step trained on


def test_toy_recipe_losses_fall_and_files_load(tmp_path):
    recipe = toy_train.ToyRecipe(pool=48, vae_steps=30, vae_batch=4, vae_natural=0, vae_lr=3e-3,
                                 steps=30, batch=8, lr=3e-3, warmup=2)
    images, captions = toy_train.render_pool(recipe)
    assert images.dtype == torch.uint8 and images.shape == (48, 3, 64, 64) and captions[0].startswith("a ")
    torch.manual_seed(recipe.seed)
    untrained_error = reconstruction_error(StableDiffusion(tiny_toy_config()), images)
    vae_model = toy_train.train_vae(recipe, images, tmp_path, config=tiny_toy_config())
    assert reconstruction_error(vae_model, images) < 0.85 * untrained_error

    scale = vae_model.config.vae.scaling_factor
    with torch.no_grad():
        z = vae_model.vae.encode(toy_train.to_model_range(images)).sample(torch.Generator().manual_seed(7))
    assert (scale * z).std().item() == pytest.approx(1, abs=0.05)  # s = 1/std(z), z ~ q(z|x): unit std

    untrained_loss = held_out_diffusion_loss(toy_train.initial_diffusion_model(recipe, tmp_path), recipe, images,
                                             captions)
    diffusion_model = toy_train.train_diffusion(recipe, images, captions, tmp_path)
    assert held_out_diffusion_loss(diffusion_model, recipe, images, captions) < 0.8 * untrained_loss
    losses = training.load_checkpoint(tmp_path / "diffusion-checkpoint.pt")["losses"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)

    loaded = StableDiffusion.load(tmp_path / "toy-sd.safetensors")
    assert loaded.config == diffusion_model.config and loaded.config.vae.scaling_factor == pytest.approx(scale)
    half = {k: v.half().float() for k, v in diffusion_model.state_dict().items()}
    assert all(torch.equal(v, half[k]) for k, v in loaded.state_dict().items())  # fp16 file, fp32 model
    info = metadata_of(tmp_path / "toy-sd.safetensors")
    assert info["recipe"] == toy_train.RECIPE and info["steps"] == "30" and info["data_seed"] == "1234"


def test_natural_images_are_seeded_and_in_range():
    first = toy_train.natural_images(4, 32, torch.Generator().manual_seed(0))
    again = toy_train.natural_images(4, 32, torch.Generator().manual_seed(0))
    assert first.shape == (4, 3, 32, 32) and torch.equal(first, again)
    assert first.min() >= -1 and first.max() <= 1 and first.std() > 0.1


def test_train_toy_command_line(tmp_path, capsys):
    args = build_parser().parse_args(["train-toy", "--out", str(tmp_path), "--stage", "vae", "--vae-steps", "7"])
    assert args.vae_steps == 7 and args.stage == "vae" and args.steps is None  # None: the stage's recipe
    assert main(["train-toy", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert main(["train-toy", "--out", str(tmp_path), "--stage", "diffusion"]) == 2  # no stage-1 file yet
    assert "run --stage vae" in capsys.readouterr().err
