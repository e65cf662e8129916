"""Training a ControlNet on (image, hint, caption) triples with Stable Diffusion locked.

Paper: *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao, Agrawala), §3.3; code:
lllyasviel/ControlNet tutorial_train.py, cldm.py, tool_add_control.py (docs/methods.md §7.3, §7.4). The objective
is SD's ε-MSE with the hint as an extra condition (paper eq. 5):

    z0 = s·z,  z ~ q(z | x);   x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,  t ~ U{0 … 999}
    L  = ‖ε − ε_θ(x_t, t, c_t, c_f)‖²,  ε_θ = the locked UNet with the ControlNet's residuals added

- Only the ControlNet learns (``sd_locked=True``); ``unlock_decoder`` also trains the UNet's decoder
  (output_blocks + out = up_blocks, conv_norm_out, conv_out), which the release calls dangerous.
- Prompt dropout: the paper replaces 50% of the prompts by "" so the ControlNet learns to read the hint on
  its own; the released code forgot it (docs/methods.md §7.4 item 1). Here ``prompt_dropout`` = 0.5 by default.
- AdamW, constant lr 1e-5, no gradient clipping, no EMA (tutorial_train.py); the ControlNet starts as a
  copy of the UNet's encoder with zero convs (``ControlNet.from_unet``).
- Several processes (``torchrun``; gloo or nccl, ``torch.distributed`` already initialised) follow
  ldm.training's contract: every process draws the same global batch of ``batch × world`` samples from the
  step's generator and trains on its own slice; DistributedDataParallel averages the gradients, so the run
  equals one process with the global batch. Only rank 0 writes checkpoints.

Data, streamed (ldm/stream.py: each step reads and encodes only its own samples): ``ToyCannyTriples`` (toy
shapes with their Canny edges), ``TripleShards`` (WebDataset tar shards, ``editlab pack``) or ``TripleFolder``
(the user's own images, laid out like the Fill50K tutorial / diffusers' controlnet example): a folder with
``prompts.jsonl`` (or ``metadata.jsonl``), one JSON object a line, paths relative to the folder,

    {"target": "images/0.png", "prompt": "a red circle", "source": "hints/0.png"}

where ``source`` (the hint) may be left out when ``detect="canny"`` computes it from the target. Items are
{image [3, S, S] in [−1, 1], hint [3, S, S] in [0, 1], caption}.

Checkpoints and exact resume come from ``ldm.training.Trainer``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import numpy as np
from PIL import Image

from ldm.images import load_image
from ldm.model import StableDiffusion
from ldm.pipeline import noise_schedule_of
from ldm.schedulers import q_sample, training_target
from ldm.shards import index_shards, list_shards
from ldm.stream import CorruptSample, StreamLoader, decode_sample, run_streaming
from ldm.training import LossFn, Part, TrainConfig, Trainer, data_parallel, enable_gradient_checkpointing
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


class ToyCannyTriples(torch.utils.data.Dataset):
    """n toy shapes (ldm.toy.shapes) with their Canny edge hints (the annotator's thresholds 100/200),
    rendered on demand: items {image [3, S, S] in [−1, 1], hint [3, S, S] in [0, 1], caption}."""

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        from ldm.toy.shapes import ShapesDataset

        self.shapes = ShapesDataset(n, seed, size)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        item = self.shapes[index]
        edges = canny(((item["image"][None] + 1) / 2).clamp(0, 1))  # [1, S, S] bool
        return {"image": item["image"], "hint": to_hint(edges, *edges.shape[-2:])[0], "caption": item["caption"]}


def toy_canny_triples(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of ToyCannyTriples(n, seed, size) at once: (images [n, 3, S, S], hints [n, 3, S, S], captions)."""
    return stack_triples(ToyCannyTriples(n, seed, size))


def stack_triples(source) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every item of a triple source in memory (for small sets and tests; training streams instead)."""
    items = [source[i] for i in range(len(source))]
    return (torch.stack([i["image"] for i in items]), torch.stack([i["hint"] for i in items]),
            [i["caption"] for i in items])


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


class TripleFolder(torch.utils.data.Dataset):
    """Training triples listed in a data folder's manifest (module docstring), read one at a time: every
    line is checked and every file's presence too when the folder is opened; images are read per item,
    resized to size × size (Lanczos), and a line without "source" gets the Canny edges of its resized target
    (thresholds 100/200, as ToyCannyTriples). Items {image [3, S, S] in [−1, 1], hint [3, S, S], caption}."""

    def __init__(self, folder: str | Path, size: int = 512, detect: str | None = "canny"):
        if detect not in (None, *DETECTORS):
            raise ValueError(f"detect must be one of {DETECTORS} or None, got {detect!r}")
        self.folder, self.size = Path(folder), size
        self.manifest = manifest_path(folder)
        self.rows = []
        for number, line in enumerate(self.manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.manifest} line {number}"
            target, prompt, source = _read_entry(line, where, detect)
            for name in (target, source):
                if name is not None and not (self.folder / name).is_file():
                    raise FileNotFoundError(f"{where}: image file {self.folder / name} not found")
            self.rows.append((target, prompt, source, where))
        if not self.rows:
            raise ValueError(f"{self.manifest} is empty; add one JSON line per training image")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        target_name, prompt, source_name, where = self.rows[index]
        try:
            return triple(lambda name: load_image(self.folder / name, (self.size, self.size)), target_name,
                          source_name, prompt, self.size)
        except (OSError, ValueError) as err:
            raise CorruptSample(f"{where}: {err}") from None


def triple(load, target_name: str, source_name: str | None, prompt: str, size: int) -> dict:
    """One item from a loader of named images ([1, 3, S, S] in [0, 1])."""
    target = load(target_name)
    if source_name is None:
        hint = to_hint(canny(target), size, size)  # edges [1, S, S] -> [1, 3, S, S]
    else:
        hint = to_hint(load(source_name), size, size)
    return {"image": target[0] * 2 - 1, "hint": hint[0], "caption": prompt}  # [0, 1] -> [−1, 1], the VAE's range


IMAGE_PARTS = ("png", "jpg", "jpeg", "webp")


class TripleShards(torch.utils.data.Dataset):
    """Triples in WebDataset tar shards: KEY.png (or .jpg/.jpeg/.webp, the target), KEY.hint.png (optional
    when ``detect``), KEY.txt (the prompt), as ``editlab pack`` writes them. Unreadable shards and incomplete
    samples are skipped with a warning when indexed (``self.index`` lists them)."""

    def __init__(self, folder: str | Path, size: int = 512, detect: str | None = "canny"):
        paths = list_shards(folder)
        if not paths:
            raise FileNotFoundError(f"{folder}: no .tar shards; write them with editlab pack")
        self.size, self.detect = size, detect
        self.index = index_shards(paths, ("txt",))
        self.index.samples = [ref for ref in self.index.samples if self._usable(ref)]
        if not self.index.samples:
            raise ValueError(f"{folder}: no readable sample in {len(paths)} shards")

    def _usable(self, ref) -> bool:
        parts = {p for p, _, _ in ref.parts}
        if parts.isdisjoint(IMAGE_PARTS) or ("hint.png" not in parts and self.detect is None):
            log.warning("%s: skipped: no image%s", self.index.name(ref), "" if self.detect else " or hint")
            self.index.skipped_samples.append(self.index.name(ref))
            return False
        return True

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, index: int) -> dict:
        return decode_sample(self.index, self.index.samples[index], self._decode)

    def _decode(self, parts: dict[str, bytes]) -> dict:
        image = next(p for p in IMAGE_PARTS if p in parts)
        load = lambda name: to_tensor(Image.open(io.BytesIO(parts[name])).convert("RGB").resize(
            (self.size, self.size), Image.LANCZOS))
        return triple(load, image, "hint.png" if "hint.png" in parts else None,
                      parts["txt"].decode("utf-8").strip(), self.size)


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def triple_source(data: str | Path, size: int, detect: str | None = "canny"):
    """A folder of .tar shards (TripleShards) or with a manifest (TripleFolder)."""
    return TripleShards(data, size, detect) if list_shards(data) else TripleFolder(data, size, detect)


def folder_triples(folder: str | Path, size: int = 512,
                   detect: str | None = "canny") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of TripleFolder(folder, size, detect) in memory: (images [N, 3, S, S] in [−1, 1], hints, captions)."""
    return stack_triples(TripleFolder(folder, size, detect))


def controlnet_loss(model: StableDiffusion, wrapper: nn.Module, loader: StreamLoader,
                    cfg: ControlTrainConfig) -> LossFn:
    """The per-step loss (module docstring) on the step's streamed triples (``loader``: ldm.stream). Every
    draw is of the global batch, then sliced to this part's rows."""
    alphas_cumprod = noise_schedule_of(model).alphas_cumprod.to(model.device)
    device = model.device
    with torch.no_grad():
        null_context = model.encode_prompt([""])

    def loss_fn(step: int, generator: torch.Generator, part: Part = Part()) -> torch.Tensor:
        n, mine = part.rows(cfg.batch)  # global batch, this part's rows of it
        batch = loader.batch(step, part)
        with torch.no_grad():
            posterior = model.vae.encode(batch["image"].to(device))  # q(z | x)
            contexts = model.encode_prompt(list(batch["caption"]))
        latent_shape = posterior.mean.shape[1:]
        noise_z = torch.randn((n, *latent_shape), generator=generator)
        noise = torch.randn((n, *latent_shape), generator=generator)
        t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < cfg.prompt_dropout  # c_t -> "" for 50% of the samples
        noise_z, noise, t, drop = (v[mine].to(device) for v in (noise_z, noise, t, drop))
        z0 = model.vae.scale_latents(posterior.mean + posterior.std * noise_z)  # s·z
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = torch.where(drop.view(-1, 1, 1), null_context, contexts)
        output = wrapper(x_t, t, context, to_hint(batch["hint"], *batch["hint"].shape[-2:]).to(device))
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return F.mse_loss(output.float(), target.float())  # ‖ε − ε_θ(x_t, t, c_t, c_f)‖²

    return loss_fn


def train_controlnet(model: StableDiffusion, controlnet: ControlNet, data, train: TrainConfig,
                     cfg: ControlTrainConfig = ControlTrainConfig(), checkpoint=None, resume: bool = False,
                     progress: bool = True, workers: int = 0, gradient_checkpointing: bool = False,
                     options: dict | None = None, force: bool = False) -> tuple[ControlNet, list[float]]:
    """Train ``controlnet`` (and the UNet decoder if unlocked) against the locked ``model`` on ``data`` (a
    map-style triple source, streamed). Returns the ControlNet and this process's loss at every step.
    ``model.unet`` changes only with ``unlock_decoder``."""
    if controlnet.control_config.unet != model.config.unet:
        raise ValueError("the ControlNet was made for another UNet; start from ControlNet.from_unet(model.unet)")
    model.requires_grad_(False).eval()
    controlnet.requires_grad_(True)
    if cfg.unlock_decoder:
        for name, param in model.unet.named_parameters():
            param.requires_grad_(name.startswith(DECODER))
    wrapper = ControlledUNet(model.unet, controlnet)
    if gradient_checkpointing:
        enable_gradient_checkpointing(wrapper)  # the ControlNet's and the UNet's blocks
    forward = data_parallel(wrapper)  # DDP averages the gradients over the processes
    loader = StreamLoader(data, cfg.batch, train.seed, train.accumulate, workers)
    # the Trainer keeps the plain module, so checkpoints do not depend on the number of processes
    trainer = Trainer(wrapper, controlnet_loss(model, forward, loader, cfg), train, checkpoint, "ControlNet", options)
    losses = run_streaming(trainer, loader, "samples", resume=resume, progress=progress, force=force)
    return controlnet.eval(), losses


def recipe(lr: float = 1e-5, steps: int = 4000, seed: int = 0, checkpoint_every: int = 500) -> TrainConfig:
    """tutorial_train.py: AdamW, constant lr 1e-5, no clipping, no EMA."""
    return TrainConfig(steps=steps, lr=lr, final_lr_fraction=1.0, grad_clip=None, ema_decay=None, seed=seed,
                       checkpoint_every=checkpoint_every)
