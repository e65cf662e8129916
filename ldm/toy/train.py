"""The toy latent diffusion recipe: train editlab's own AutoencoderKL, CLIP text encoder and UNet (the
``toy`` preset) from scratch on the procedural shapes of shapes.py, in under an hour on a 2-core CPU.

Paper: *High-Resolution Image Synthesis with Latent Diffusion Models* (Rombach et al., 2022).

Stage 1, the autoencoder (LDM §3.1 without its GAN and LPIPS terms), on toy images and on procedural
"natural" colour fields (so that a downscaled photograph also survives the round trip):
    L_vae = mean|x − x̂| + mean(x − x̂)² + w_KL·KL(q(z|x) ‖ N(0, I)) / (3HW),
    KL = ½ Σ (μ² + σ² − 1 − log σ²)      (w_KL = 1e-6 as LDM's kl_weight, against per-pixel sums)
then the scaling factor s = 1 / std(z), z ~ q(z|x) over a batch of toy images (LDM's 0.18215, Appendix G).

Stage 2, text encoder and UNet jointly (DDPM's simple loss, eq. 14, in latent space, LDM eq. 2):
    z0 = s·(μ + σ·n),  x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,  t ~ U{0 … 999} on SD's scaled_linear schedule,
    L = w(t)·‖ε − ε_θ(x_t, t, τ(y))‖²,  w(t) = min(SNR(t), γ)/SNR(t),  SNR(t) = ᾱ_t/(1−ᾱ_t)
(the Min-SNR-γ weighting of *Efficient Diffusion Training via Min-SNR Weighting Strategy*, Hang et al.,
2023, γ = 5), with the caption replaced by "" 10% of the time so classifier-free guidance works
(*Classifier-Free Diffusion Guidance*, Ho & Salimans).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig, toy
from ..model import StableDiffusion
from ..schedulers import NoiseSchedule, q_sample, training_target
from ..training import LossFn, Trainer, TrainConfig, step_generator
from .shapes import ShapesDataset

log = logging.getLogger(__name__)

STAGES = ("vae", "diffusion", "all")
RECIPE = "editlab-toy-v1"


@dataclass(frozen=True)
class ToyRecipe:
    seed: int = 0  # seeds initialisation and every per-step draw
    data_seed: int = 1234  # seeds the rendered shapes (ShapesDataset)
    pool: int = 8192  # rendered toy images, reused by both stages
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_natural: int = 4  # of each VAE batch: procedural natural-looking images (the rest are toy images)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 7000  # diffusion steps
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0  # None: plain ε-MSE
    ema_decay: float = 0.999

    def __post_init__(self):
        if not 0 <= self.vae_natural < self.vae_batch:
            raise ValueError(f"vae_natural must be in [0, vae_batch), got {self.vae_natural} of {self.vae_batch}")
        if self.pool < max(self.batch, self.vae_batch):
            raise ValueError(f"pool ({self.pool}) must hold at least one batch")


# ------------------------------------------------------------------------------------------------- data


def render_pool(recipe: ToyRecipe, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """The first ``recipe.pool`` images of ShapesDataset(seed=data_seed): uint8 [N, 3, H, W] and captions."""
    data = ShapesDataset(recipe.pool, recipe.data_seed, size)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([((it["image"] + 1) * 127.5).round().to(torch.uint8) for it in items])
    return images, [it["caption"] for it in items]


def natural_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Stand-ins for photographs, [n, 3, size, size] in [−1, 1]: a 1/f colour field (Gaussian octaves of
    2×2 … size/2 cells, bilinearly upsampled: equal power per octave, as natural images) mixed through a
    random colour matrix, with a few hard-edged ellipses on top (object edges)."""
    field = torch.zeros(n, 3, size, size)
    if n == 0:
        return field
    for octave in range(1, int(math.log2(size))):
        cells = torch.randn(n, 3, 2**octave, 2**octave, generator=generator)
        field = field + F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)
    mixing = torch.randn(n, 3, 3, generator=generator) * 0.5 + torch.eye(3)
    field = torch.einsum("nij,njhw->nihw", mixing, field)
    field = field / field.flatten(1).std(dim=1).view(n, 1, 1, 1)  # unit contrast per image
    contrast, brightness = torch.rand(2, n, 1, 1, 1, generator=generator)
    images = brightness - 0.5 + (0.2 + 0.4 * contrast) * field
    coords = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    for _ in range(3):  # ellipses: centre, radii, colour, and whether to draw at all
        cx, cy, rx, ry, keep = torch.rand(5, n, 1, 1, generator=generator)
        colour = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
        inside = ((x - cx) / (0.05 + 0.3 * rx)) ** 2 + ((y - cy) / (0.05 + 0.3 * ry)) ** 2 <= 1
        inside = (inside & (keep < 0.6)).unsqueeze(1)  # [n, H, W] -> [n, 1, H, W]
        images = torch.where(inside, colour, images)
    return images.clamp(-1, 1)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1  # uint8 -> [−1, 1]


# ------------------------------------------------------------------------------------------ stage 1: VAE


def vae_loss(model: StableDiffusion, images: torch.Tensor, recipe: ToyRecipe) -> LossFn:
    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        n_toy = recipe.vae_batch - recipe.vae_natural
        toy_batch = to_model_range(images[torch.randint(len(images), (n_toy,), generator=generator)])
        flips = torch.rand(n_toy, 2, generator=generator) < 0.5  # augment: mirror left-right and up-down
        toy_batch = torch.where(flips[:, 0, None, None, None], toy_batch.flip(-1), toy_batch)
        toy_batch = torch.where(flips[:, 1, None, None, None], toy_batch.flip(-2), toy_batch)
        x = torch.cat([toy_batch, natural_images(recipe.vae_natural, images.shape[-1], generator)])
        posterior = model.vae.encode(x)
        x_hat = model.vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).flatten(1).sum(1)
        return (x - x_hat).abs().mean() + ((x - x_hat) ** 2).mean() + recipe.kl_weight * kl.mean() / x[0].numel()

    return loss_fn


@torch.no_grad()
def measure_scaling_factor(model: StableDiffusion, images: torch.Tensor, generator: torch.Generator) -> float:
    """s = 1 / std of posterior samples z ~ q(z|x) over ``images`` (uint8 [N, 3, H, W])."""
    z = torch.cat([model.vae.encode(to_model_range(chunk)).sample(generator) for chunk in images.split(64)])
    return float(1 / z.std())


def with_scaling_factor(model: StableDiffusion, scaling_factor: float) -> StableDiffusion:
    """A new model whose config carries the measured scaling factor, with the same weights."""
    vae_cfg = dataclasses.replace(model.config.vae, scaling_factor=scaling_factor)
    rebuilt = StableDiffusion(model.config.replace(vae=vae_cfg))
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


# ---------------------------------------------------------------------------- stage 2: text encoder + UNet


@torch.no_grad()
def encode_pool(model: StableDiffusion, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, [N, 4, h, w] each (the VAE is frozen in stage 2)."""
    model.vae.eval()
    moments = [model.vae.encode(to_model_range(chunk)) for chunk in images.split(64)]
    return torch.cat([m.mean for m in moments]), torch.cat([m.std for m in moments])


def diffusion_loss(model: StableDiffusion, means: torch.Tensor, stds: torch.Tensor, captions: list[str],
                   recipe: ToyRecipe) -> LossFn:
    alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod
    ids = model.tokenizer(captions)  # [N, 77], tokenized once
    empty = model.tokenizer([""])[0]

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(means), (recipe.batch,), generator=generator)
        z = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator)  # z ~ q(z|x)
        z0 = model.vae.scale_latents(z)  # z0 = s·z
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(len(alphas_cumprod), (recipe.batch,), generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        drop = torch.rand(recipe.batch, generator=generator) < recipe.caption_dropout
        context = model.text_encoder(torch.where(drop[:, None], empty, ids[pick]))
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε (or v)
        per_sample = ((model.unet(x_t, t, context) - target) ** 2).mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma is not None:
            snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())  # SNR(t) = ᾱ/(1−ᾱ)
            per_sample = per_sample * snr.clamp(max=recipe.min_snr_gamma) / snr  # min(SNR, γ)/SNR
        return per_sample.mean()

    return loss_fn


# ------------------------------------------------------------------------------------------ the recipe


def save_half(model: StableDiffusion, path: Path, metadata: dict[str, str]) -> None:
    """StableDiffusion.save with fp16 tensors (half the file; ``load`` copies them into fp32 parameters)."""
    half = StableDiffusion(model.config)
    half.load_state_dict(model.state_dict())
    half.half().save(path, metadata)


def metadata(recipe: ToyRecipe, **extra) -> dict[str, str]:
    return {"recipe": RECIPE, "recipe_settings": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
            "seed": str(recipe.seed), "data_seed": str(recipe.data_seed), "vae_steps": str(recipe.vae_steps),
            "steps": str(recipe.steps), **{k: str(v) for k, v in extra.items()}}


def train_vae(recipe: ToyRecipe, images: torch.Tensor, out: Path, resume: bool = False,
              config: ModelConfig | None = None, force: bool = False) -> StableDiffusion:
    """Stage 1; writes out/vae.safetensors (the whole model, VAE trained, scaling factor measured)."""
    torch.manual_seed(recipe.seed)  # initialisation
    model = StableDiffusion(config or toy())
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    cfg = TrainConfig(steps=recipe.vae_steps, lr=recipe.vae_lr, warmup=min(100, recipe.vae_steps // 10),
                      seed=recipe.seed, checkpoint_every=200)
    trainer = Trainer(model, vae_loss(model, images, recipe), cfg, out / "vae-checkpoint.pt", "VAE", options(recipe))
    start = time.time()
    losses = trainer.run(resume=resume, force=force)
    model.eval()
    scale = measure_scaling_factor(model, images[:512], step_generator(recipe.seed, 0, stream=1))
    model = with_scaling_factor(model, scale)
    model.save(out / "vae.safetensors", metadata(recipe, stage="vae", vae_loss=f"{mean_tail(losses):.5f}"))
    log.info("VAE: %d steps in %.0f s, final loss %.4f, scaling factor %.4f", len(losses), time.time() - start,
             mean_tail(losses), scale)
    return model


def initial_diffusion_model(recipe: ToyRecipe, out: Path) -> StableDiffusion:
    """The trained VAE of out/vae.safetensors with a freshly initialised text encoder and UNet."""
    model = StableDiffusion.load(out / "vae.safetensors")
    torch.manual_seed(recipe.seed + 1)  # initialisation of the text encoder and UNet, independent of stage 1
    fresh = StableDiffusion(model.config)
    model.unet.load_state_dict(fresh.unet.state_dict())
    model.text_encoder.load_state_dict(fresh.text_encoder.state_dict())
    return model


def train_diffusion(recipe: ToyRecipe, images: torch.Tensor, captions: list[str], out: Path,
                    resume: bool = False, force: bool = False) -> StableDiffusion:
    """Stage 2 from out/vae.safetensors; writes out/toy-sd.safetensors (fp16 tensors, EMA weights)."""
    model = initial_diffusion_model(recipe, out)
    means, stds = encode_pool(model, images)
    model.vae.requires_grad_(False)
    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup=min(recipe.warmup, recipe.steps // 10),
                      ema_decay=recipe.ema_decay, seed=recipe.seed + 1, checkpoint_every=250)
    loss_fn = diffusion_loss(model, means, stds, captions, recipe)
    trainer = Trainer(model, loss_fn, cfg, out / "diffusion-checkpoint.pt", "text encoder + UNet", options(recipe))
    start = time.time()
    losses = trainer.run(resume=resume, force=force)
    model = trainer.final_model().eval()
    info = metadata(recipe, stage="all", diffusion_loss=f"{mean_tail(losses):.5f}",
                    scaling_factor=model.config.vae.scaling_factor)
    save_half(model, out / "toy-sd.safetensors", info)
    log.info("diffusion: %d steps in %.0f s, final loss %.4f", len(losses), time.time() - start, mean_tail(losses))
    return model


def options(recipe: ToyRecipe) -> dict:
    """The recipe as the options a checkpoint records (a resumed run with another --data-seed is refused)."""
    return {f"--{name.replace('_', '-')}": value for name, value in dataclasses.asdict(recipe).items()}


def mean_tail(losses: list[float], n: int = 100) -> float:
    tail = losses[-n:]
    return sum(tail) / max(1, len(tail))


def train_toy(out: str | Path, recipe: ToyRecipe = ToyRecipe(), stage: str = "all", resume: bool = False,
              force: bool = False) -> Path:
    """Run the recipe's ``stage`` ("vae", "diffusion" or "all") into folder ``out``; returns the last file
    written (out/vae.safetensors or out/toy-sd.safetensors)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    out = Path(out)
    if stage == "diffusion" and not (out / "vae.safetensors").is_file():
        raise FileNotFoundError(f"{out / 'vae.safetensors'} not found; run --stage vae (or all) first")
    start = time.time()
    images, captions = render_pool(recipe)
    log.info("rendered %d toy images in %.0f s", len(images), time.time() - start)
    if stage in ("vae", "all"):  # resuming a finished stage only reloads its last checkpoint
        train_vae(recipe, images, out, resume=resume and (out / "vae-checkpoint.pt").is_file(), force=force)
        if stage == "vae":
            return out / "vae.safetensors"
    train_diffusion(recipe, images, captions, out, resume=resume and (out / "diffusion-checkpoint.pt").is_file(),
                    force=force)
    return out / "toy-sd.safetensors"
