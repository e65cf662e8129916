"""A small, generic training loop that resumes to the same bits: editlab's training commands (the toy model,
InstructPix2Pix, ControlNet, textual inversion) all run on it.

Three rules make an interrupted run end with exactly the weights of an uninterrupted one (on the CPU):

1. Every random draw of step s (batch indices, noise, timesteps, caption dropout) comes from its own
   generator, seeded from (seed, s) by ``step_generator``; nothing depends on an iterator's position.
2. The learning rate is a pure function of the step (``learning_rate``), not a scheduler object's state.
3. A checkpoint holds the model, the optimiser moments, the EMA weights, the gradient scaler, the step (which
   is the data position: step s reads samples [s·G, (s+1)·G) of the stream, ldm/stream.py), the loss history,
   the global RNG states and the options that change the result, written atomically (``ldm.files``): a crash
   leaves the last good one. Ctrl-C saves at the step reached and stops (ldm/interrupt.py).

Formulas:
- AdamW (*Decoupled Weight Decay Regularization*, Loshchilov & Hutter): θ ← θ − lr·(m̂/(√v̂ + ε) + λθ).
- Learning rate: linear warm-up, then cosine decay to a floor (*SGDR*, Loshchilov & Hutter):
  lr(s) = peak·(s+1)/W for s < W, else floor + (peak − floor)·½(1 + cos(π·(s − W)/(S − W))).
- EMA of the weights (Polyak averaging, as LDM's LitEma): θ̄ ← d·θ̄ + (1 − d)·θ, d = min(decay, (1+n)/(10+n))
  after n updates, so the average forgets the random initialisation quickly.
- Gradient accumulation over A micro-steps: ∇ = (1/A)·Σ_k ∇ mean_k, the gradient of the mean over A·b samples.
- Mixed precision: the loss runs under autocast (bf16 or fp16); fp16 scales the loss by S before backward and
  unscales the gradients (∇/S) before clipping, halving S and skipping the step when they overflow
  (``torch.amp.GradScaler``); bf16 has fp32's exponent range and needs no scaling. Weights and AdamW stay fp32.

Several processes (``torchrun --nproc_per_node P``, DistributedDataParallel; gloo on the CPU) change none of
this. The contract, which ``world``, ``batch_share``, ``data_parallel`` and ``Trainer.save`` implement:

- Every process draws the SAME global batch of G = batch × P × A samples from the step's generator (every
  draw at the global size, in the same order as one process would) and keeps only its own rows: the loss
  gets a ``Part`` (index k·P + r of P·A parts for micro-step k on rank r) and ``part.rows(batch)`` gives
  rows [(k·P + r)·batch, (k·P + r + 1)·batch).
- The loss calls the model through ``data_parallel(module)``: DDP sums the gradients over the processes and
  divides by P, so with equal slices ∇ = (1/(P·A))·Σ_{r,k} ∇ mean_{r,k} = ∇ mean over the global batch, and
  the run equals one process with batch × P × A and no accumulation (up to float summation order); it also
  resumes on another number of processes with the same G.
- The Trainer keeps the plain module, so checkpoints do not depend on P. Only rank 0 writes them; the others
  wait at a barrier. On resume every process reads the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpointed
from tqdm.auto import tqdm

from .files import atomic_path, remove_stale_temporaries
from .interrupt import Interrupted, StopFlag, check_fresh_start, check_options
from .seeding import derived_seed

log = logging.getLogger(__name__)

# (step, generator of that step[, part]) -> scalar loss; losses that split a global batch take the Part
LossFn = Callable[..., torch.Tensor]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    accumulate: int = 1  # micro-steps per optimiser step (gradient accumulation)
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast and a gradient scaler)

    def __post_init__(self):
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} for {self.steps} steps")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): numpy's SeedSequence mixes the three."""
    return torch.Generator().manual_seed(derived_seed(seed, step, stream))


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def start_processes(backend: str = "gloo") -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment); returns world().
    ``backend``: "gloo" (CPU) or "nccl" (GPUs; each process then takes GPU LOCAL_RANK as its "cuda" device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)  # rank, world size and the rendezvous come from torchrun's variables
    return world()


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def end_processes() -> None:
    """Wait for every process, then leave the process group (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Part:
    """Which rows of the step's global batch one forward pass takes: part ``index`` of ``count`` equal parts
    (index = micro-step·P + rank, count = P·A)."""

    index: int = 0
    count: int = 1

    def rows(self, batch: int) -> tuple[int, slice]:
        """(global batch = batch × count, this part's rows of it): draw at the first, train on the second."""
        return batch * self.count, slice(self.index * batch, (self.index + 1) * batch)


def batch_share(batch: int) -> tuple[int, slice]:
    """(global batch = batch × world size, this rank's rows of it), without accumulation."""
    rank, size = world()
    return Part(rank, size).rows(batch)


def enable_gradient_checkpointing(module: nn.Module, block_types: tuple[type, ...] | None = None) -> int:
    """Recompute the activations of every block of ``block_types`` (default: the UNet's and ControlNet's
    ResBlock and SpatialTransformer) in the backward pass instead of keeping them: memory falls to the blocks'
    inputs, compute rises by about one forward. Gradients are unchanged (the same kernels run again).
    Only in training mode with gradients on. Returns the number of blocks wrapped."""
    if block_types is None:
        from .layers import ResBlock, SpatialTransformer

        block_types = (ResBlock, SpatialTransformer)
    wrapped = 0
    for block in module.modules():
        if isinstance(block, block_types) and not getattr(block, "_checkpointed", False):
            plain = block.forward

            @functools.wraps(plain)
            def forward(*args, _plain=plain, _block=block, **kwargs):
                if _block.training and torch.is_grad_enabled():
                    return checkpointed(_plain, *args, use_reentrant=False, **kwargs)
                return _plain(*args, **kwargs)

            block.forward, block._checkpointed = forward, True
            wrapped += 1
    return wrapped


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

    ``loss_fn(step, generator)`` or ``loss_fn(step, generator, part)`` draws everything random for that step
    from ``generator`` and returns the scalar loss; the three-argument form takes the rows ``part.rows(b)``
    of the global batch (needed for accumulation). ``run`` resumes from ``checkpoint`` when asked, and can
    stop early (``stop_at``) leaving a checkpoint, which is how tests interrupt a run. Under torchrun, see the
    module docstring: ``model`` is the plain module, ``loss_fn`` calls ``data_parallel(model)``.
    ``options``: what the command line was given that changes the result (recorded; checked on resume).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, checkpoint: str | Path | None = None,
                 description: str = "training", options: dict | None = None):
        self.model, self.loss_fn, self.cfg, self.description = model, loss_fn, cfg, description
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.options = dict(options or {})
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameter; set requires_grad on what should learn")
        self.splits_batch = len(inspect.signature(loss_fn).parameters) >= 3
        if cfg.accumulate > 1 and not self.splits_batch:
            raise ValueError("gradient accumulation needs a loss that takes its part of the batch "
                             "(loss_fn(step, generator, part)); this one does not")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.device_type = self.parameters[0].device.type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.precision == "fp16")
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0
        self.losses: list[float] = []  # one per step done, also across resumes

    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "step": self.step, "steps": self.cfg.steps,
                "finished": self.step >= self.cfg.steps, "options": self.options, "losses": self.losses,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": _numpy_state(), "python_rng": repr(random.getstate())}

    def load_state_dict(self, state: dict) -> None:
        check_options(state.get("options"), self.options)
        mine = dataclasses.asdict(self.cfg)
        for name in mine:
            if state["config"].get(name) != mine[name] and name != "checkpoint_every":
                raise ValueError(f"the checkpoint was made with other training settings ({name} = "
                                 f"{state['config'].get(name)!r}, now {mine[name]!r}); resume with the same options "
                                 "or start a new run without --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses = state["step"], list(state["losses"])
        torch.set_rng_state(state["torch_rng"])
        if "numpy_rng" in state:
            np.random.set_state(_numpy_state(state["numpy_rng"]))
            random.setstate(_python_state(state["python_rng"]))

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; the other processes wait until it is written)."""
        rank, size = world()
        if not all(torch.isfinite(p).all() for p in self.parameters):  # never replace a good checkpoint with NaN
            raise FloatingPointError(f"the weights became NaN or infinite by step {self.step}; nothing saved (the "
                                     "last checkpoint is kept); lower the learning rate")
        if self.checkpoint is not None and rank == 0:
            save_checkpoint(self.checkpoint, self.state_dict())
        if size > 1:
            dist.barrier()

    def autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_step(self) -> float:
        """One optimiser step at ``self.step``: A micro-steps of loss and backward, unscale, clip, AdamW, EMA."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rank, size = world()
        accumulate, total = self.cfg.accumulate, 0.0
        for micro in range(accumulate):
            generator = step_generator(self.cfg.seed, self.step)  # the same draws for every part of the step
            with self.autocast():
                if self.splits_batch:
                    loss = self.loss_fn(self.step, generator, Part(micro * size + rank, size * accumulate))
                else:
                    loss = self.loss_fn(self.step, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower the learning rate")
            self.scaler.scale(loss.float() / accumulate).backward()  # ∇ = (1/A)·Σ_k ∇ mean_k
            total += loss.item() / accumulate
        self.scaler.unscale_(self.optimizer)  # ∇/S (fp16); a no-op otherwise
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.losses.append(total)
        return total

    def run(self, resume: bool = False, stop_at: int | None = None, progress: bool = True,
            force: bool = False) -> list[float]:
        """Train until cfg.steps (or ``stop_at``); returns the loss of every step done so far. Ctrl-C saves a
        checkpoint at the step reached and raises ``Interrupted``. Without ``resume`` an unfinished run's
        checkpoint is not overwritten unless ``force``."""
        if self.checkpoint is not None:
            check_fresh_start(self.checkpoint, resume, force)
            if world()[0] == 0:
                remove_stale_temporaries(self.checkpoint)
        elif resume:
            raise ValueError("resume needs a checkpoint path")
        if resume:
            self.load_state_dict(load_checkpoint(self.checkpoint))
            log.info("%s: resumed at step %d of %d", self.description, self.step, self.cfg.steps)
        end = self.cfg.steps if stop_at is None else min(stop_at, self.cfg.steps)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress or world()[0] != 0,
                   desc=self.description)
        with StopFlag() as stop:
            while self.step < end:
                self.train_step()
                bar.update(1)
                lr = learning_rate(self.step - 1, self.cfg)
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}", lr=f"{lr:.2e}")  # loss: mean of last 50
                if stop.agreed() and self.step < end:
                    bar.close()
                    self.save()
                    raise Interrupted(f"step {self.step}", self.checkpoint or "nothing (no checkpoint path)")
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


def _numpy_state(state=None):
    """numpy's global RNG state as plain lists (a checkpoint holds no numpy objects), or back."""
    if state is None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    kind, keys, pos, has_gauss, gauss = state
    return kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def _python_state(text: str):
    import ast

    return ast.literal_eval(text)
