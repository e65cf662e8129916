"""inversion.embedding_optimiser: frozen entries, timestep draws, smoothed-loss pick, exact resume (the real
SIGKILL of a training process is in tests/test_visii.py, through the `editlab visii` command)."""

import pytest
import torch

from inversion.embedding_optimiser import EmbeddingConfig, draw_timesteps, optimise_embedding
from ldm.training import load_checkpoint, step_generator

TRAINABLE = torch.tensor([True, False, True, True, False])


def problem():
    """Fit rows of a [5, 3] embedding to a target through a noisy, t-dependent quadratic loss."""
    initial = torch.linspace(-1, 1, 15).reshape(5, 3)
    target = torch.arange(15.0).reshape(5, 3) / 10

    def loss_fn(embedding, t, generator):
        noise = 0.05 * torch.randn(embedding.shape, generator=generator)
        weight = 1 + t.float().mean() / 1000
        return weight * ((embedding - target + noise) ** 2).mean()

    return initial, target, loss_fn


CFG = EmbeddingConfig(steps=40, lr=5e-2, timesteps="permutation", num_train_timesteps=16, checkpoint_every=5,
                      seed=3)


def test_loss_falls_and_only_trainable_rows_move():
    initial, target, loss_fn = problem()
    result = optimise_embedding(initial, TRAINABLE, loss_fn, CFG, progress=False)
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    for embedding in (result.final, result.best):
        assert torch.equal(embedding[~TRAINABLE], initial[~TRAINABLE])  # exactly, despite weight decay
        assert (embedding[TRAINABLE] - initial[TRAINABLE]).abs().min() > 1e-3
    assert (result.final[TRAINABLE] - target[TRAINABLE]).abs().mean() < (initial - target)[TRAINABLE].abs().mean() / 2


def test_best_is_chosen_by_the_smoothed_loss():
    initial, _, loss_fn = problem()
    result = optimise_embedding(initial, TRAINABLE, loss_fn, CFG, progress=False)
    d = CFG.loss_smoothing
    average, smoothed = 0.0, []
    for s, loss in enumerate(result.losses):  # ℓ̄ = d·ℓ̄ + (1 − d)·ℓ, bias-corrected
        average = d * average + (1 - d) * loss
        smoothed.append(average / (1 - d ** (s + 1)))
    assert result.smoothed == pytest.approx(smoothed, rel=1e-12)
    window = 10  # ⌈1/(1 − 0.9)⌉
    best_step = min(range(window, CFG.steps + 1), key=lambda n: smoothed[n - 1])
    assert result.best_step == best_step


def test_timestep_draws():
    cfg = EmbeddingConfig(steps=100, timesteps="permutation", num_train_timesteps=10, batch=3, seed=1)
    stream = torch.cat([draw_timesteps(cfg, s, step_generator(1, s)) for s in range(10)])  # 30 draws = 3 epochs
    for epoch in range(3):
        assert sorted(stream[10 * epoch: 10 * epoch + 10].tolist()) == list(range(10))  # each t once per epoch
    assert not torch.equal(stream[:10], stream[10:20])  # a new shuffle each epoch
    uniform = EmbeddingConfig(steps=100, batch=64, num_train_timesteps=10)
    a, b = (draw_timesteps(uniform, 4, step_generator(0, 4)) for _ in range(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 9 and len(a.unique()) == 10


def test_value_clipping_bounds_every_update():
    initial, _, loss_fn = problem()
    cfg = EmbeddingConfig(steps=1, lr=1.0, weight_decay=0.0, clip_value=1e-6, seed=3)
    big = lambda e, t, g: 1e6 * loss_fn(e, t, g)  # huge gradients: clipping leaves their signs only
    result = optimise_embedding(initial, TRAINABLE, big, cfg, progress=False)
    # first Adam step moves every entry by lr·g/(|g| + ε) ≈ lr whatever the gradient's size
    moved = (result.final - initial)[TRAINABLE].abs()
    assert torch.allclose(moved, torch.full_like(moved, 1.0), atol=0.02)
    with pytest.raises(ValueError, match="no entry of the embedding is trainable"):
        optimise_embedding(initial, torch.zeros(5, dtype=torch.bool), loss_fn, cfg, progress=False)


def test_resume_in_process_is_exact(tmp_path):
    initial, _, loss_fn = problem()
    straight = optimise_embedding(initial, TRAINABLE, loss_fn, CFG, progress=False)
    optimise_embedding(initial, TRAINABLE, loss_fn, CFG, tmp_path / "run.pt", stop_at=17, progress=False)
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 17
    resumed = optimise_embedding(initial, TRAINABLE, loss_fn, CFG, tmp_path / "run.pt", resume=True, progress=False)
    assert torch.equal(resumed.final, straight.final) and torch.equal(resumed.best, straight.best)
    assert resumed.losses == straight.losses and resumed.best_step == straight.best_step
    other = EmbeddingConfig(**{**CFG.__dict__, "clip_value": 0.1})
    with pytest.raises(ValueError, match="other settings"):
        optimise_embedding(initial, TRAINABLE, loss_fn, other, tmp_path / "run.pt", resume=True, progress=False)
