"""Training InstructPix2Pix: fine-tune a text-to-image model into an instruction-following editor.

Paper: *InstructPix2Pix: Learning to Follow Image Editing Instructions* (Brooks et al., CVPR 2023), §3.2 and
§3.3; code: timothybrooks/instruct-pix2pix ddpm_edit.py, diffusers examples/instruct_pix2pix/
train_instruct_pix2pix.py (METHODS.md §6.2).

1. Widen the UNet's conv_in from 4 to 8 input channels: the new weights [:, 4:] are zero, so at initialisation
   the model is exactly the text-to-image model, whatever the image latent is (CHECKPOINTS.md §11).
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
ldm.training's multi-process contract: every process draws the global batch of ``batch × world`` pairs from
the step's generator and trains on its slice; DDP averages the gradients (= one process with the global batch).
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
from ldm.schedulers import NoiseSchedule, q_sample, training_target
from ldm.training import LossFn, TrainConfig, Trainer, batch_share, data_parallel

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


@dataclass
class EncodedPairs:
    """The frozen encoders' view of the training pairs, computed once."""

    image_latents: torch.Tensor  # c_I = E(before).mode(), unscaled, [N, 4, h, w]
    target_means: torch.Tensor  # q(z | after): mean and std, [N, 4, h, w] each
    target_stds: torch.Tensor
    contexts: torch.Tensor  # CLIP hidden states of each distinct instruction, [K, 77, C]
    instruction_index: torch.Tensor  # pair -> row of contexts, [N]
    null_context: torch.Tensor  # ∅_T = CLIP(""), [1, 77, C]


@torch.no_grad()
def encode_pairs(model: StableDiffusion, dataset, chunk: int = 32) -> EncodedPairs:
    """Run the frozen VAE and text encoder over every pair of ``dataset`` (items: before, after, instruction)."""
    items = [dataset[i] for i in range(len(dataset))]
    before = torch.stack([item["before"] for item in items])  # [N, 3, H, W] in [0, 1]
    after = torch.stack([item["after"] for item in items])
    encode = lambda images: [model.vae.encode((c * 2 - 1).to(model.device)) for c in images.split(chunk)]
    image_latents = torch.cat([posterior.mode() for posterior in encode(before)])
    targets = encode(after)
    instructions = sorted({item["instruction"] for item in items})
    row = {text: k for k, text in enumerate(instructions)}
    contexts = torch.cat([model.encode_prompt(instructions[k:k + chunk]) for k in range(0, len(instructions), chunk)])
    return EncodedPairs(image_latents, torch.cat([p.mean for p in targets]), torch.cat([p.std for p in targets]),
                        contexts, torch.tensor([row[item["instruction"]] for item in items]),
                        model.encode_prompt([""]))


def ip2p_loss(model: StableDiffusion, pairs: EncodedPairs, cfg: IP2PTrainConfig,
              unet: nn.Module | None = None) -> LossFn:
    """The per-step loss (module docstring); every random draw comes from the step's generator, at the
    global batch size, then this process keeps its rows. ``unet``: what to call (DDP); None: ``model.unet``."""
    alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod.to(model.device)
    device = model.device
    n, mine = batch_share(cfg.batch)  # global batch, this process's rows of it
    latent_shape = pairs.target_means.shape[1:]

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(pairs.image_latents), (n,), generator=generator)
        noise_z = torch.randn((n, *latent_shape), generator=generator)
        noise = torch.randn((n, *latent_shape), generator=generator)
        t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
        drop_text, drop_image = conditioning_dropout(n, generator, cfg.dropout)
        pick, noise_z, noise, t, drop_text, drop_image = (
            v[mine].to(device) for v in (pick, noise_z, noise, t, drop_text, drop_image))
        z0 = model.vae.scale_latents(pairs.target_means[pick] + pairs.target_stds[pick] * noise_z)  # s·z
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = torch.where(drop_text.view(-1, 1, 1), pairs.null_context, pairs.contexts[pairs.instruction_index[pick]])
        image = pairs.image_latents[pick] * (~drop_image).view(-1, 1, 1, 1)  # c_I, or ∅_I = 0
        forward = unet if unet is not None else model.unet
        output = forward(torch.cat([x_t, image], dim=1), t, context)  # [B, 8, h, w] in
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return F.mse_loss(output.float(), target.float())

    return loss_fn


def train_ip2p(model: StableDiffusion, dataset, train: TrainConfig, cfg: IP2PTrainConfig = IP2PTrainConfig(),
               checkpoint=None, resume: bool = False, progress: bool = True) -> tuple[StableDiffusion, list[float]]:
    """Fine-tune an 8-channel ``model`` (see widen_conv_in) on ``dataset``; only the UNet learns.
    Returns the model (with the EMA weights when train.ema_decay is set) and this process's loss at every step."""
    check_ip2p_model(model)
    if len(dataset) < 1:
        raise ValueError("the dataset holds no pairs")
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.vae.eval()
    model.text_encoder.eval()
    pairs = encode_pairs(model, dataset)
    log.info("encoded %d pairs (%d distinct instructions)", len(pairs.image_latents), len(pairs.contexts))
    loss_fn = ip2p_loss(model, pairs, cfg, data_parallel(model.unet))  # DDP averages the gradients
    # the Trainer keeps the plain UNet, so checkpoints do not depend on the number of processes
    trainer = Trainer(model.unet, loss_fn, train, checkpoint, "InstructPix2Pix UNet")
    losses = trainer.run(resume=resume, progress=progress)
    trainer.final_model()
    return model.eval(), losses
