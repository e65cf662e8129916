"""Training InstructPix2Pix: fine-tune a text-to-image model into an instruction-following editor.

Paper: *InstructPix2Pix: Learning to Follow Image Editing Instructions* (Brooks et al., CVPR 2023), §3.2 and
§3.3; code: timothybrooks/instruct-pix2pix ddpm_edit.py, diffusers examples/instruct_pix2pix/
train_instruct_pix2pix.py (docs/methods.md §6.2).

1. Widen the UNet's conv_in from 4 to 8 input channels: the new weights [:, 4:] are zero, so at initialisation
   the model is exactly the text-to-image model, whatever the image latent is (docs/checkpoints.md §11).
2. For each pair (x_before, instruction, x_after), with the text encoder and the VAE frozen:

       z0  = s·z,  z ~ q(z | x_after)                 target latent (posterior sample, scaled)
       c_I = E(x_before).mode()                       conditioning latent (unscaled)
       x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,  t ~ U{0 … 999}
       L   = ‖ε − ε_θ([x_t ‖ c_I], t, c_T)‖²         (v-models: target v = √ᾱ ε − √(1−ᾱ) z0)

3. Conditioning dropout (paper §3.3, p = 0.05), one uniform r per sample, as both references:
       c_T -> ∅_T (CLIP of "") if r < 2p;    c_I -> 0 if p ≤ r < 3p
   so 5% of samples lose only the text, 5% both, 5% only the image: the model learns ε(∅, c_I) and ε(∅, ∅),
   which two-way guidance needs (controls/image_condition.py).

Optimiser, learning rate, EMA and resumable checkpoints come from ldm.training (paper: AdamW, lr 1e-4, no
warm-up, batch 1024, 256²; the release is sampled with its EMA weights). Under torchrun the run follows
ldm.training's multi-process contract: every process draws the noise of the global batch of
``batch × world × accumulate`` pairs from the step's generator and trains on its part; the pairs themselves
are streamed (ldm/stream.py: each part reads only its own pairs, in an order fixed by the seed). DDP averages
the gradients (= one process with the global batch).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from controls.image_condition import check_ip2p_model
from ldm.model import StableDiffusion
from ldm.pipeline import noise_schedule_of
from ldm.schedulers import q_sample, training_target
from ldm.stream import StreamLoader, run_streaming
from ldm.training import LossFn, Part, TrainConfig, Trainer, data_parallel, enable_gradient_checkpointing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IP2PTrainConfig:
    batch: int = 32  # pairs per process and step (paper: 32 per GPU × 8 GPUs × 4 accumulation = 1024)
    dropout: float = 0.05  # p of the conditioning dropout (5% text-only, 5% both, 5% image-only)

    def __post_init__(self):
        if self.batch < 1 or not 0 <= self.dropout <= 1 / 3:
            raise ValueError(f"need batch >= 1 and dropout in [0, 1/3], got batch={self.batch}, dropout={self.dropout}")


def widen_conv_in(model: StableDiffusion) -> StableDiffusion:
    """A copy of ``model`` whose UNet takes [noisy latent ‖ image latent]: conv_in [C, 4, 3, 3] -> [C, 8, 3, 3]
    with the 4 new input channels zero. SD 1.x becomes family "ip2p"; other families (toy) keep theirs, which
    sets their native image size."""
    unet_cfg = model.config.unet
    if unet_cfg.in_channels != model.config.vae.latent_channels:
        raise ValueError(f"the UNet already takes {unet_cfg.in_channels} input channels; widen a text-to-image "
                         f"model ({model.config.vae.latent_channels} channels)")
    family = "ip2p" if model.config.family == "sd1" else model.config.family
    config = model.config.replace(unet=dataclasses.replace(unet_cfg, in_channels=2 * unet_cfg.in_channels),
                                  family=family)
    state = dict(model.state_dict())
    old = state["unet.conv_in.weight"]
    state["unet.conv_in.weight"] = torch.cat([old, torch.zeros_like(old)], dim=1)  # [C, 4, 3, 3] -> [C, 8, 3, 3]
    wide = StableDiffusion(config).to(model.device)
    wide.load_state_dict(state, strict=True)
    return wide


def conditioning_dropout(batch: int, generator: torch.Generator, p: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image), bool [B] each, from one uniform r per sample: r < 2p and p ≤ r < 3p."""
    r = torch.rand(batch, generator=generator)
    return r < 2 * p, (r >= p) & (r < 3 * p)


@torch.no_grad()
def encode_batch(model: StableDiffusion, batch: dict, device) -> tuple[torch.Tensor, object, torch.Tensor]:
    """The frozen encoders on one streamed batch: (c_I = E(before).mode() unscaled, q(z | after), CLIP(instruction))."""
    to_vae = lambda images: (images * 2 - 1).to(device)  # [0, 1] -> [−1, 1]
    return (model.vae.encode(to_vae(batch["before"])).mode(), model.vae.encode(to_vae(batch["after"])),
            model.encode_prompt(list(batch["instruction"])))


def ip2p_loss(model: StableDiffusion, loader: StreamLoader, cfg: IP2PTrainConfig,
              unet: nn.Module | None = None) -> LossFn:
    """The per-step loss (module docstring) on the step's streamed pairs (``loader``: ldm.stream). Every random
    draw comes from the step's generator at the global batch size, then this part keeps its rows.
    ``unet``: what to call (DDP); None: ``model.unet``."""
    alphas_cumprod = noise_schedule_of(model).alphas_cumprod.to(model.device)
    device = model.device
    with torch.no_grad():
        null_context = model.encode_prompt([""])  # ∅_T = CLIP("")

    def loss_fn(step: int, generator: torch.Generator, part: Part = Part()) -> torch.Tensor:
        n, mine = part.rows(cfg.batch)  # global batch, this part's rows of it
        batch = loader.batch(step, part)
        image_latents, posterior, contexts = encode_batch(model, batch, device)
        latent_shape = image_latents.shape[1:]
        noise_z = torch.randn((n, *latent_shape), generator=generator)
        noise = torch.randn((n, *latent_shape), generator=generator)
        t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
        drop_text, drop_image = conditioning_dropout(n, generator, cfg.dropout)
        noise_z, noise, t, drop_text, drop_image = (
            v[mine].to(device) for v in (noise_z, noise, t, drop_text, drop_image))
        z0 = model.vae.scale_latents(posterior.mean + posterior.std * noise_z)  # s·z, z ~ q(z | after)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = torch.where(drop_text.view(-1, 1, 1), null_context, contexts)
        image = image_latents * (~drop_image).view(-1, 1, 1, 1)  # c_I, or ∅_I = 0
        forward = unet if unet is not None else model.unet
        output = forward(torch.cat([x_t, image], dim=1), t, context)  # [B, 8, h, w] in
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return F.mse_loss(output.float(), target.float())

    return loss_fn


def train_ip2p(model: StableDiffusion, dataset, train: TrainConfig, cfg: IP2PTrainConfig = IP2PTrainConfig(),
               checkpoint=None, resume: bool = False, progress: bool = True, workers: int = 0,
               gradient_checkpointing: bool = False, options: dict | None = None,
               force: bool = False) -> tuple[StableDiffusion, list[float]]:
    """Fine-tune an 8-channel ``model`` (see widen_conv_in) on ``dataset`` (map-style pairs, streamed: each step
    reads and encodes only its own pairs, ``workers`` dataloader processes read ahead); only the UNet learns.
    Returns the model (with the EMA weights when train.ema_decay is set) and this process's loss at every step."""
    check_ip2p_model(model)
    if len(dataset) < 1:
        raise ValueError("the dataset holds no pairs")
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.vae.eval()
    model.text_encoder.eval()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model.unet)
    loader = StreamLoader(dataset, cfg.batch, train.seed, train.accumulate, workers)
    loss_fn = ip2p_loss(model, loader, cfg, data_parallel(model.unet))  # DDP averages the gradients
    # the Trainer keeps the plain UNet, so checkpoints do not depend on the number of processes
    trainer = Trainer(model.unet, loss_fn, train, checkpoint, "InstructPix2Pix UNet", options)
    losses = run_streaming(trainer, loader, "pairs", resume=resume, progress=progress, force=force)
    trainer.final_model()
    return model.eval(), losses
