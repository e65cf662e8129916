"""A small, generic training loop that resumes to the same bits: editlab's training commands (the toy model,
InstructPix2Pix, ControlNet, textual inversion) all run on it.

Three rules make an interrupted run end with exactly the weights of an uninterrupted one (on the CPU):

1. Every random draw of step s (batch indices, noise, timesteps, caption dropout) comes from its own
   generator, seeded from (seed, s) by ``step_generator``; nothing depends on an iterator's position.
2. The learning rate is a pure function of the step (``learning_rate``), not a scheduler object's state.
3. A checkpoint holds the model, the optimiser moments, the EMA weights, the step, the loss history and the
   global RNG state, written atomically (``ldm.files.atomic_path``): a crash leaves the last good one.

Formulas:
- AdamW (*Decoupled Weight Decay Regularization*, Loshchilov & Hutter): θ ← θ − lr·(m̂/(√v̂ + ε) + λθ).
- Learning rate: linear warm-up, then cosine decay to a floor (*SGDR*, Loshchilov & Hutter):
  lr(s) = peak·(s+1)/W for s < W, else floor + (peak − floor)·½(1 + cos(π·(s − W)/(S − W))).
- EMA of the weights (Polyak averaging, as LDM's LitEma): θ̄ ← d·θ̄ + (1 − d)·θ, d = min(decay, (1+n)/(10+n))
  after n updates, so the average forgets the random initialisation quickly.

Several processes (``torchrun --nproc_per_node P``, DistributedDataParallel; gloo on the CPU) change none of
this. The contract, which ``world``, ``batch_share``, ``data_parallel`` and ``Trainer.save`` implement:

- Every process draws the SAME global batch of ``batch × P`` samples from the step's generator (every draw at
  the global size, in the same order as one process would) and keeps only its own rows, ``batch_share``:
  rank r takes rows [r·batch, (r+1)·batch).
- The loss calls the model through ``data_parallel(module)``: DDP sums the gradients over the processes and
  divides by P, so with equal slices ∇ = (1/P)·Σ_r ∇ mean_r = ∇ mean over the global batch, and the run
  equals one process with batch × P (up to float summation order).
- The Trainer keeps the plain module, so checkpoints do not depend on P. Only rank 0 writes them; the others
  wait at a barrier. On resume every process reads the same file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .files import atomic_path

log = logging.getLogger(__name__)

LossFn = Callable[[int, torch.Generator], torch.Tensor]  # (step, generator of that step) -> scalar loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimiser steps in the whole run
    lr: float = 1e-4  # peak learning rate
    warmup: int = 0  # steps of linear warm-up
    final_lr_fraction: float = 0.1  # cosine decay ends at final_lr_fraction · lr
    weight_decay: float = 0.01  # AdamW λ
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # clip the global gradient norm; None: no clipping
    ema_decay: float | None = None  # None: no EMA
    seed: int = 0  # seeds the per-step generators
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} for {self.steps} steps")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): numpy's SeedSequence mixes the three."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # in Python ints: numpy < 2 refuses uint64 >> int64


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def start_processes(backend: str = "gloo") -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment); returns world()."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)  # rank, world size and the rendezvous come from torchrun's variables
    return world()


def end_processes() -> None:
    """Wait for every process, then leave the process group (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def batch_share(batch: int) -> tuple[int, slice]:
    """(global batch = batch × world size, this rank's rows of it): draw at the first, train on the second."""
    rank, size = world()
    return batch * size, slice(rank * batch, (rank + 1) * batch)


def data_parallel(module: nn.Module) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel (which averages the gradients) when several processes
    run, else ``module`` itself. Call the model through it in the loss; give the Trainer the plain module."""
    return nn.parallel.DistributedDataParallel(module) if world()[1] > 1 else module


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.final_lr_fraction·cfg.lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    floor = cfg.lr * cfg.final_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """Exponential moving average of a model's trainable parameters (names as in ``named_parameters``)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1 - d)  # θ̄ ← d·θ̄ + (1 − d)·θ

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (keep a copy first to go back)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the checkpoint's EMA covers other parameters than this model; "
                             "resume with the same model and trainable parameters")
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save ``state`` to ``path`` atomically: a crash mid-write leaves the previous file untouched."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; start without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, lists and dicts only


class Trainer:
    """Optimise the trainable parameters of ``model`` (those with requires_grad) on ``loss_fn`` with AdamW.

    ``loss_fn(step, generator)`` draws everything random for that step from ``generator`` and returns the
    scalar loss. ``run`` resumes from ``checkpoint`` when asked, and can stop early (``stop_at``) leaving a
    checkpoint, which is how tests interrupt a run. Under torchrun, see the module docstring: ``model`` is the
    plain module, ``loss_fn`` slices with ``batch_share`` and calls ``data_parallel(model)``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, checkpoint: str | Path | None = None,
                 description: str = "training"):
        self.model, self.loss_fn, self.cfg, self.description = model, loss_fn, cfg, description
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameter; set requires_grad on what should learn")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0
        self.losses: list[float] = []  # one per step done, also across resumes

    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "step": self.step, "losses": self.losses,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != dataclasses.asdict(self.cfg):
            raise ValueError(f"the checkpoint was made with other training settings ({state['config']}); "
                             "resume with the same options or start a new run without --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.losses = state["step"], list(state["losses"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; the other processes wait until it is written)."""
        rank, size = world()
        if self.checkpoint is not None and rank == 0:
            save_checkpoint(self.checkpoint, self.state_dict())
        if size > 1:
            dist.barrier()

    def train_step(self) -> float:
        """One optimiser step at ``self.step``: loss, backward, clip, AdamW, EMA."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        self.model.train()
        loss = self.loss_fn(self.step, step_generator(self.cfg.seed, self.step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def run(self, resume: bool = False, stop_at: int | None = None, progress: bool = True) -> list[float]:
        """Train until cfg.steps (or ``stop_at``); returns the loss of every step done so far."""
        if resume:
            if self.checkpoint is None:
                raise ValueError("resume needs a checkpoint path")
            self.load_state_dict(load_checkpoint(self.checkpoint))
            log.info("%s: resumed at step %d of %d", self.description, self.step, self.cfg.steps)
        end = self.cfg.steps if stop_at is None else min(stop_at, self.cfg.steps)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress or world()[0] != 0,
                   desc=self.description)
        while self.step < end:
            self.train_step()
            bar.update(1)
            lr = learning_rate(self.step - 1, self.cfg)
            bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}", lr=f"{lr:.2e}")  # loss: mean of the last 50
            if self.step % self.cfg.checkpoint_every == 0 and self.step < end:
                self.save()
        bar.close()
        self.save()
        return self.losses

    def final_model(self) -> nn.Module:
        """The model with the EMA weights copied in (when EMA is on); call after ``run``."""
        if self.ema is not None:
            self.ema.copy_to(self.model)
        return self.model
