"""One engine for the methods that learn a text embedding against a frozen diffusion model.

Used by textual inversion (*An Image is Worth One Word*, Gal et al., ICLR 2023: new rows of the token
embedding table) and Visii (*Visual Instruction Inversion*, Nguyen et al., NeurIPS 2023: the text encoder's
output hidden states of one instruction). docs/methods.md §10, §11.

What it does, per step s (everything random comes from ``ldm.training.step_generator(seed, s)``):

1. Timesteps: ``"uniform"`` t ~ U{0 … T−1} (textual inversion), or ``"permutation"``: step s takes entry
   s mod T of a shuffled permutation of 0 … T−1 drawn for epoch ⌊s/T⌋, so each timestep is used once per
   epoch (Visii's 1000 steps = one pass over the shuffled timesteps).
2. loss = loss_fn(embedding, t, generator); the loss draws its noise from the same generator.
3. Gradients of frozen entries are zeroed; optional value clipping g ← clamp(g, −c, c) (Visii clips to the
   initial embedding's largest value) and optional global-norm clipping; then AdamW at a constant rate:
   θ ← θ − lr·(m̂/(√v̂ + ε) + λθ).
4. Frozen entries are reset to their initial values (weight decay would otherwise move them).
5. Smoothed loss (an exponential moving average, bias-corrected):
   ℓ̄_s = d·ℓ̄_{s−1} + (1 − d)·ℓ_s,  ℓ̂_s = ℓ̄_s / (1 − d^(s+1)).
   The returned ("best") embedding is the one after the step with the lowest ℓ̂, counted from step
   ⌈1/(1 − d)⌉ (or the last step when the run is shorter): a single step's loss depends mostly on its random
   t and ε, so picking the lowest raw loss (as Visii's reference does) picks noise (docs/methods.md §10.2 pitfall 3).

Optimiser state, step, loss history, smoothed loss and best embedding go into an atomic checkpoint
(``ldm.training``), so a killed run resumed from it ends with exactly the bits of an uninterrupted one (CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.interrupt import check_options
from ldm.training import TrainConfig, Trainer, step_generator

TIMESTEP_DRAWS = ("uniform", "permutation")

# (embedding, timesteps [B], generator of this step) -> scalar loss
EmbeddingLoss = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class EmbeddingConfig:
    steps: int = 1000
    lr: float = 1e-3  # constant learning rate
    weight_decay: float = 0.01  # AdamW λ (bitsandbytes' AdamW8bit and diffusers' TI script use 1e-2)
    batch: int = 1  # timesteps drawn per step
    timesteps: str = "uniform"  # "uniform" or "permutation" (see module docstring)
    num_train_timesteps: int = 1000
    clip_value: float | None = None  # clamp every gradient entry to [−c, c]; None: off
    clip_norm: float | None = None  # clip the gradient's global L2 norm; None: off
    loss_smoothing: float = 0.9  # d of the smoothed loss that picks the returned embedding
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"need steps >= 1, batch >= 1 and lr > 0; got {self.steps}, {self.batch}, {self.lr}")
        if self.timesteps not in TIMESTEP_DRAWS:
            raise ValueError(f"timesteps must be one of {TIMESTEP_DRAWS}, got {self.timesteps!r}")
        if not 0 <= self.loss_smoothing < 1:
            raise ValueError(f"loss_smoothing must be in [0, 1), got {self.loss_smoothing}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, final_lr_fraction=1.0, weight_decay=self.weight_decay,
                           grad_clip=self.clip_norm, seed=self.seed, checkpoint_every=self.checkpoint_every)


def draw_timesteps(cfg: EmbeddingConfig, step: int, generator: torch.Generator) -> torch.Tensor:
    """The cfg.batch timesteps (long [B]) of ``step``; uniform ones come from the step's generator."""
    T = cfg.num_train_timesteps
    if cfg.timesteps == "uniform":
        return torch.randint(0, T, (cfg.batch,), generator=generator)
    positions = step * cfg.batch + torch.arange(cfg.batch)  # place of each draw in the endless shuffled stream
    out = torch.empty(cfg.batch, dtype=torch.long)
    for epoch in positions.div(T, rounding_mode="floor").unique().tolist():
        permutation = torch.randperm(T, generator=step_generator(cfg.seed, epoch, stream=1))
        here = positions.div(T, rounding_mode="floor") == epoch
        out[here] = permutation[positions[here] % T]
    return out


class LearnedEmbedding(nn.Module):
    """The learned tensor ``value`` (starting at ``initial``); only entries where ``trainable`` is True may
    change. ``trainable`` covers the leading dimensions of ``initial`` (e.g. [77] for [77, C] hidden states)."""

    def __init__(self, initial: torch.Tensor, trainable: torch.Tensor):
        super().__init__()
        trainable = trainable.to(torch.bool)
        if tuple(trainable.shape) != tuple(initial.shape[: trainable.ndim]):
            raise ValueError(f"trainable mask of shape {tuple(trainable.shape)} does not cover the leading "
                             f"dimensions of the embedding {tuple(initial.shape)}")
        if not trainable.any():
            raise ValueError("no entry of the embedding is trainable; mark at least one position as trainable")
        initial = initial.detach().float().clone()
        self.value = nn.Parameter(initial.clone())
        self.register_buffer("initial", initial)
        self.register_buffer("trainable", trainable.reshape(*trainable.shape, *[1] * (initial.ndim - trainable.ndim)))

    def forward(self) -> torch.Tensor:
        return self.value

    @torch.no_grad()
    def reset_frozen(self) -> None:
        self.value.copy_(torch.where(self.trainable, self.value, self.initial))


@dataclass
class EmbeddingResult:
    best: torch.Tensor  # the embedding picked by the smoothed loss (module docstring)
    final: torch.Tensor  # after the last step
    best_step: int  # number of steps done when ``best`` was taken
    losses: list[float]  # raw loss of every step
    smoothed: list[float]  # bias-corrected smoothed loss of every step


class _EmbeddingTrainer(Trainer):
    """ldm.training.Trainer plus: frozen entries reset after every step, the smoothed loss and the best
    embedding (kept in the checkpoint)."""

    def __init__(self, embedding: LearnedEmbedding, loss_fn: EmbeddingLoss, cfg: EmbeddingConfig, checkpoint,
                 description: str, options: dict | None = None):
        def step_loss(step: int, generator: torch.Generator) -> torch.Tensor:
            return loss_fn(embedding(), draw_timesteps(cfg, step, generator), generator)

        super().__init__(embedding, step_loss, cfg.train_config(), checkpoint, description, options)
        self.embedding_cfg = cfg
        self.window = min(cfg.steps, math.ceil(1 / (1 - cfg.loss_smoothing)))
        self.average, self.smoothed = 0.0, []
        self.best, self.best_step, self.best_loss = embedding.value.detach().clone(), 0, math.inf
        mask, clip = embedding.trainable, cfg.clip_value
        embedding.value.register_hook(lambda g: (g * mask).clamp(-clip, clip) if clip is not None else g * mask)

    def train_step(self) -> float:
        loss = super().train_step()
        self.model.reset_frozen()
        d = self.embedding_cfg.loss_smoothing
        self.average = d * self.average + (1 - d) * loss  # ℓ̄_s = d·ℓ̄_{s−1} + (1 − d)·ℓ_s
        self.smoothed.append(self.average / (1 - d ** self.step))  # bias correction (self.step = s + 1 here)
        if (self.step >= self.window or self.step == self.embedding_cfg.steps) and self.smoothed[-1] < self.best_loss:
            self.best, self.best_step, self.best_loss = self.model.value.detach().clone(), self.step, self.smoothed[-1]
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "embedding_config": dataclasses.asdict(self.embedding_cfg),
                "average": self.average, "smoothed": self.smoothed, "best": self.best,
                "best_step": self.best_step, "best_loss": self.best_loss}

    def load_state_dict(self, state: dict) -> None:
        check_options(state.get("options"), self.options)  # first: it names the option that differs
        if state.get("embedding_config") != dataclasses.asdict(self.embedding_cfg):
            raise ValueError(f"the checkpoint was made with other settings ({state.get('embedding_config')}); "
                             "resume with the same options or start a new run without --resume")
        if not torch.equal(state["model"]["initial"], self.model.initial):
            raise ValueError("the checkpoint started from another initial embedding (other inputs, model or init "
                             "prompt); resume with the same inputs or start without --resume")
        super().load_state_dict(state)
        self.average, self.smoothed = state["average"], list(state["smoothed"])
        self.best, self.best_step, self.best_loss = state["best"].clone(), state["best_step"], state["best_loss"]


def optimise_embedding(initial: torch.Tensor, trainable: torch.Tensor, loss_fn: EmbeddingLoss,
                       cfg: EmbeddingConfig, checkpoint: str | Path | None = None, resume: bool = False,
                       stop_at: int | None = None, progress: bool = True, description: str = "embedding",
                       options: dict | None = None, force: bool = False) -> EmbeddingResult:
    """Minimise ``loss_fn(embedding, t, generator)`` over the ``trainable`` entries of ``initial``.

    ``checkpoint``: file written every cfg.checkpoint_every steps and at the end; ``resume`` continues from it.
    ``stop_at`` stops after that many steps (leaving a checkpoint), as an interruption would. ``options``:
    the inputs that change the result, recorded and checked on resume; ``force`` starts over an unfinished run.
    """
    embedding = LearnedEmbedding(initial, trainable)
    trainer = _EmbeddingTrainer(embedding, loss_fn, cfg, checkpoint, description, options)
    trainer.run(resume=resume, stop_at=stop_at, progress=progress, force=force)
    return EmbeddingResult(trainer.best.clone(), embedding.value.detach().clone(), trainer.best_step,
                           list(trainer.losses), list(trainer.smoothed))
