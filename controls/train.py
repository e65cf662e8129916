"""Training a ControlNet on (image, hint, caption) triples with Stable Diffusion locked.

Paper: *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao, Agrawala), §3.3; code:
lllyasviel/ControlNet tutorial_train.py, cldm.py, tool_add_control.py (METHODS.md §7.3, §7.4). The objective
is SD's ε-MSE with the hint as an extra condition (paper eq. 5):

    z0 = s·z,  z ~ q(z | x);   x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,  t ~ U{0 … 999}
    L  = ‖ε − ε_θ(x_t, t, c_t, c_f)‖²,  ε_θ = the locked UNet with the ControlNet's residuals added

- Only the ControlNet learns (``sd_locked=True``); ``unlock_decoder`` also trains the UNet's decoder
  (output_blocks + out = up_blocks, conv_norm_out, conv_out), which the release calls dangerous.
- Prompt dropout: the paper replaces 50% of the prompts by "" so the ControlNet learns to read the hint on
  its own; the released code forgot it (METHODS.md §7.4.1). Here ``prompt_dropout`` = 0.5 by default.
- AdamW, constant lr 1e-5, no gradient clipping, no EMA (tutorial_train.py); the ControlNet starts as a
  copy of the UNet's encoder with zero convs (``ControlNet.from_unet``).
- Several processes (``torchrun``; gloo or nccl, ``torch.distributed`` already initialised): every process
  draws the same global batch of ``batch × world`` samples from the step's generator and trains on its own
  slice; DistributedDataParallel averages the gradients, so the run equals one process with the global
  batch. Only rank 0 writes checkpoints.

Checkpoints and exact resume come from ``ldm.training.Trainer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldm.model import StableDiffusion
from ldm.schedulers import NoiseSchedule, velocity
from ldm.training import LossFn, TrainConfig, Trainer
from ldm.unet import UNet

from .canny import canny
from .controlnet import ControlNet
from .hints import to_hint

log = logging.getLogger(__name__)

DECODER = ("up_blocks.", "conv_norm_out.", "conv_out.")  # LDM output_blocks + out


@dataclass(frozen=True)
class ControlTrainConfig:
    batch: int = 4  # samples per process and step (tutorial_train.py: 4)
    prompt_dropout: float = 0.5  # share of prompts replaced by "" (paper §3.3; missing from the released code)
    unlock_decoder: bool = False  # also train the UNet decoder (sd_locked=False)

    def __post_init__(self):
        if self.batch < 1 or not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"need batch >= 1 and prompt_dropout in [0, 1], got {self.batch}, {self.prompt_dropout}")


class ControlledUNet(nn.Module):
    """The locked UNet with the ControlNet attached: y = F(x) + Z(F'(x + Z(c))) at every skip and the mid."""

    def __init__(self, unet: UNet, controlnet: ControlNet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        down, mid = self.controlnet(x, t, context, hint)
        return self.unet(x, t, context, down, mid)


@dataclass
class EncodedTriples:
    """The frozen encoders' view of the training set, computed once."""

    hints: torch.Tensor  # [N, 3, H, W] in [0, 1]
    latent_means: torch.Tensor  # q(z | x): mean and std, [N, 4, h, w] each
    latent_stds: torch.Tensor
    contexts: torch.Tensor  # CLIP hidden states per sample, [N, 77, C]
    null_context: torch.Tensor  # CLIP(""), [1, 77, C]


@torch.no_grad()
def encode_triples(model: StableDiffusion, images: torch.Tensor, hints: torch.Tensor, captions: list[str],
                   chunk: int = 32) -> EncodedTriples:
    """images [N, 3, H, W] in [−1, 1], hints [N, 3, H, W] in [0, 1] (checked), one caption each."""
    if not len(images) == len(hints) == len(captions) or len(images) == 0:
        raise ValueError(f"need as many images, hints and captions (> 0), got {len(images)}, {len(hints)}, "
                         f"{len(captions)}")
    hints = to_hint(hints, *hints.shape[-2:])  # validates the [0, 1] range and the 3 channels
    posteriors = [model.vae.encode(part.to(model.device)) for part in images.split(chunk)]
    contexts = torch.cat([model.encode_prompt(captions[k:k + chunk]) for k in range(0, len(captions), chunk)])
    return EncodedTriples(hints.to(model.device), torch.cat([p.mean for p in posteriors]),
                          torch.cat([p.std for p in posteriors]), contexts, model.encode_prompt([""]))


def toy_canny_triples(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n toy shapes (ldm.toy.shapes) with their Canny edge hints (the annotator's thresholds 100/200):
    (images [n, 3, size, size] in [−1, 1], hints [n, 3, size, size] in [0, 1], captions)."""
    from ldm.toy.shapes import ShapesDataset

    items = [ShapesDataset(n, seed, size)[i] for i in range(n)]
    images = torch.stack([item["image"] for item in items])
    edges = canny(((images + 1) / 2).clamp(0, 1))  # [n, size, size] bool
    return images, to_hint(edges, size, size), [item["caption"] for item in items]


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def controlnet_loss(model: StableDiffusion, wrapper: nn.Module, data: EncodedTriples,
                    cfg: ControlTrainConfig) -> LossFn:
    """The per-step loss (module docstring). Every draw is of the global batch, then sliced by rank."""
    alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod.to(model.device)
    v_model = model.config.prediction_type == "v_prediction"
    rank, size = world()
    mine = slice(rank * cfg.batch, (rank + 1) * cfg.batch)
    device = model.device

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        n = cfg.batch * size
        pick = torch.randint(len(data.hints), (n,), generator=generator)
        noise_z = torch.randn((n, *data.latent_means.shape[1:]), generator=generator)
        noise = torch.randn((n, *data.latent_means.shape[1:]), generator=generator)
        t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < cfg.prompt_dropout  # c_t -> "" for 50% of the samples
        pick, noise_z, noise, t, drop = (v[mine].to(device) for v in (pick, noise_z, noise, t, drop))
        z0 = model.vae.scale_latents(data.latent_means[pick] + data.latent_stds[pick] * noise_z)  # s·z
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = torch.where(drop.view(-1, 1, 1), data.null_context, data.contexts[pick])
        output = wrapper(x_t, t, context, data.hints[pick])
        target = velocity(noise, z0, alpha_bar) if v_model else noise
        return F.mse_loss(output.float(), target.float())  # ‖ε − ε_θ(x_t, t, c_t, c_f)‖²

    return loss_fn


class _RankZeroTrainer(Trainer):
    """Trainer whose checkpoints only rank 0 writes; the others wait for it."""

    def save(self) -> None:
        rank, size = world()
        if rank == 0:
            super().save()
        if size > 1:
            dist.barrier()


def train_controlnet(model: StableDiffusion, controlnet: ControlNet, data: EncodedTriples, train: TrainConfig,
                     cfg: ControlTrainConfig = ControlTrainConfig(), checkpoint=None, resume: bool = False,
                     progress: bool = True) -> tuple[ControlNet, list[float]]:
    """Train ``controlnet`` (and the UNet decoder if unlocked) against the locked ``model``. Returns the
    ControlNet and this process's loss at every step. ``model.unet`` changes only with ``unlock_decoder``."""
    if controlnet.control_config.unet != model.config.unet:
        raise ValueError("the ControlNet was made for another UNet; start from ControlNet.from_unet(model.unet)")
    model.requires_grad_(False).eval()
    controlnet.requires_grad_(True)
    if cfg.unlock_decoder:
        for name, param in model.unet.named_parameters():
            param.requires_grad_(name.startswith(DECODER))
    wrapper = ControlledUNet(model.unet, controlnet)
    forward = nn.parallel.DistributedDataParallel(wrapper) if world()[1] > 1 else wrapper  # DDP averages gradients
    # the Trainer keeps the plain module, so checkpoints do not depend on the number of processes
    trainer = _RankZeroTrainer(wrapper, controlnet_loss(model, forward, data, cfg), train, checkpoint, "ControlNet")
    losses = trainer.run(resume=resume, progress=progress)
    return controlnet.eval(), losses


def recipe(lr: float = 1e-5, steps: int = 4000, seed: int = 0, checkpoint_every: int = 500) -> TrainConfig:
    """tutorial_train.py: AdamW, constant lr 1e-5, no clipping, no EMA."""
    return TrainConfig(steps=steps, lr=lr, final_lr_fraction=1.0, grad_clip=None, ema_decay=None, seed=seed,
                       checkpoint_every=checkpoint_every)
