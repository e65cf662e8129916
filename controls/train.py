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
- Several processes (``torchrun``; gloo or nccl, ``torch.distributed`` already initialised) follow
  ldm.training's contract: every process draws the same global batch of ``batch × world`` samples from the
  step's generator and trains on its own slice; DistributedDataParallel averages the gradients, so the run
  equals one process with the global batch. Only rank 0 writes checkpoints.

Data: ``toy_canny_triples`` (toy shapes with their Canny edges) or ``folder_triples`` (the user's own images,
laid out like the Fill50K tutorial / diffusers' controlnet example): a folder with ``prompts.jsonl`` (or
``metadata.jsonl``), one JSON object a line, paths relative to the folder,

    {"target": "images/0.png", "prompt": "a red circle", "source": "hints/0.png"}

where ``source`` (the hint) may be left out when ``detect="canny"`` computes it from the target. Both return
(images [N, 3, S, S] in [−1, 1], hints [N, 3, S, S] in [0, 1], captions), ready for ``encode_triples``.

Checkpoints and exact resume come from ``ldm.training.Trainer``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.images import load_image
from ldm.model import StableDiffusion
from ldm.schedulers import NoiseSchedule, q_sample, training_target
from ldm.training import LossFn, TrainConfig, Trainer, batch_share, data_parallel
from ldm.unet import UNet

from .canny import canny
from .controlnet import ControlNet
from .hints import to_hint

log = logging.getLogger(__name__)

DECODER = ("up_blocks.", "conv_norm_out.", "conv_out.")  # LDM output_blocks + out
MANIFESTS = ("prompts.jsonl", "metadata.jsonl")  # Fill50K's name, then diffusers' (first found is read)
DETECTORS = ("canny",)


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


def manifest_path(folder: str | Path) -> Path:
    """The folder's ``prompts.jsonl`` (or ``metadata.jsonl``); FileNotFoundError naming both if neither exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data folder")
    for name in MANIFESTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {' or '.join(MANIFESTS)}; write one JSON object per line, e.g. "
                            '{"target": "images/0.png", "prompt": "...", "source": "hints/0.png"}')


def _read_entry(line: str, where: str, detect: str | None) -> tuple[str, str, str | None]:
    """One manifest line -> (target, prompt, source or None); ValueError naming ``where`` if malformed."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("target"), str) \
            or not isinstance(entry.get("prompt"), str):
        raise ValueError(f'{where}: need an object with string "target" and "prompt" fields, got {line[:80]!r}')
    source = entry.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError(f'{where}: "source" must be a path string, got {source!r}')
    if source is None and detect is None:
        raise ValueError(f'{where}: no "source" hint image; add one or detect hints (detect="canny", --detect canny)')
    return entry["target"], entry["prompt"], source


def _load(folder: Path, name: str, where: str, size: int) -> torch.Tensor:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {path} not found")
    return load_image(path, (size, size))  # [1, 3, size, size] in [0, 1], Lanczos-resized


def folder_triples(folder: str | Path, size: int = 512,
                   detect: str | None = "canny") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Training triples from a data folder (module docstring): (images [N, 3, size, size] in [−1, 1],
    hints [N, 3, size, size] in [0, 1], captions). Every image is resized to size × size (Lanczos); a line
    without "source" gets the Canny edges of its resized target (thresholds 100/200, as toy_canny_triples)."""
    if detect not in (None, *DETECTORS):
        raise ValueError(f"detect must be one of {DETECTORS} or None, got {detect!r}")
    folder = Path(folder)
    manifest = manifest_path(folder)
    images, hints, captions = [], [], []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        target_name, prompt, source_name = _read_entry(line, where, detect)
        target = _load(folder, target_name, where, size)  # x ∈ [0, 1]
        if source_name is None:
            hint = to_hint(canny(target), size, size)  # edges [1, size, size] -> [1, 3, size, size]
        else:
            hint = to_hint(_load(folder, source_name, where, size), size, size)
        images.append(target * 2 - 1)  # [0, 1] -> [−1, 1], the VAE's range
        hints.append(hint)
        captions.append(prompt)
    if not captions:
        raise ValueError(f"{manifest} is empty; add one JSON line per training image")
    return torch.cat(images), torch.cat(hints), captions


def controlnet_loss(model: StableDiffusion, wrapper: nn.Module, data: EncodedTriples,
                    cfg: ControlTrainConfig) -> LossFn:
    """The per-step loss (module docstring). Every draw is of the global batch, then sliced by rank."""
    alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod.to(model.device)
    n, mine = batch_share(cfg.batch)  # global batch, this process's rows of it
    device = model.device

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(data.hints), (n,), generator=generator)
        noise_z = torch.randn((n, *data.latent_means.shape[1:]), generator=generator)
        noise = torch.randn((n, *data.latent_means.shape[1:]), generator=generator)
        t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < cfg.prompt_dropout  # c_t -> "" for 50% of the samples
        pick, noise_z, noise, t, drop = (v[mine].to(device) for v in (pick, noise_z, noise, t, drop))
        z0 = model.vae.scale_latents(data.latent_means[pick] + data.latent_stds[pick] * noise_z)  # s·z
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = torch.where(drop.view(-1, 1, 1), data.null_context, data.contexts[pick])
        output = wrapper(x_t, t, context, data.hints[pick])
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return F.mse_loss(output.float(), target.float())  # ‖ε − ε_θ(x_t, t, c_t, c_f)‖²

    return loss_fn


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
    forward = data_parallel(wrapper)  # DDP averages the gradients over the processes
    # the Trainer keeps the plain module, so checkpoints do not depend on the number of processes
    trainer = Trainer(wrapper, controlnet_loss(model, forward, data, cfg), train, checkpoint, "ControlNet")
    losses = trainer.run(resume=resume, progress=progress)
    return controlnet.eval(), losses


def recipe(lr: float = 1e-5, steps: int = 4000, seed: int = 0, checkpoint_every: int = 500) -> TrainConfig:
    """tutorial_train.py: AdamW, constant lr 1e-5, no clipping, no EMA."""
    return TrainConfig(steps=steps, lr=lr, final_lr_fraction=1.0, grad_clip=None, ema_decay=None, seed=seed,
                       checkpoint_every=checkpoint_every)
