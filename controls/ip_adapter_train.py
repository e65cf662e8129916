"""Training an IP-Adapter (*IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models*, Ye et al. 2023, §3.2-3.3), and the recipe of the bundled toy adapter.

Frozen: the UNet, the text encoder, the VAE and the CLIP image encoder. Trained: the image projection
(controls/ip_adapter.py ``ImageProjection``) and the new keys and values W_k_ip, W_v_ip of every
cross-attention layer, each initialised from that layer's text W_k, W_v (as the official training script).
The loss is the plain diffusion loss with both conditions (§3.3, eq. 4):

    L = E ‖ε − ε_θ(x_t, t, c_t, c_i)‖²,   x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,   t ~ U{0 … 999}

with the conditions dropped for classifier-free guidance (eq. 5): the text replaced by "" with probability
p_text, the image embedding by zeros with p_image, both with p_both (paper: 0.05 each). During training
the image branch has scale λ = 1 in every layer (the decoupled attention of ``ImagePromptHook``).

The toy adapter (``train_toy_ip_adapter``) uses the toy CLIP's image tower as its image encoder (its
embeddings, 64-d, are what the projection reads) and the toy model's own training images and captions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm.attention import attached
from ldm.clip_vision import preprocess
from ldm.files import atomic_path, file_sha256
from ldm.model import StableDiffusion
from ldm.pipeline import noise_schedule_of
from ldm.toy.train import ToyRecipe, encode_pool, render_pool
from ldm.training import Trainer, TrainConfig

from .ip_adapter import ImagePromptHook, IPAdapter, processor_table

log = logging.getLogger(__name__)
IP_ADAPTER_RECIPE = "editlab-toy-ip-adapter-v1"


@dataclass(frozen=True)
class AdapterRecipe:
    seed: int = 0
    data_seed: int = 1234  # the toy diffusion model's own training images (ldm/toy/train.py)
    pool: int = 4096
    steps: int = 400
    batch: int = 16
    lr: float = 2e-3  # paper 1e-4 at batch 8×… on SD; the toy adapter is tiny and trained briefly
    warmup: int = 50
    n_tokens: int = 4  # image tokens T (paper: 4)
    # drop the text only. Paper 0.05; the toy's captions name everything but the place, size and texture, so
    # with text nearly always present the image branch would learn little of colour and shape: 0.25
    p_text: float = 0.25
    p_image: float = 0.05  # drop the image only
    p_both: float = 0.05  # drop both

    def __post_init__(self):
        if min(self.p_text, self.p_image, self.p_both) < 0 or self.p_text + self.p_image + self.p_both >= 1:
            raise ValueError("drop probabilities must be >= 0 and sum to less than 1")


def init_from_text_branch(adapter: IPAdapter, unet: torch.nn.Module) -> None:
    """W_k_ip ← W_k, W_v_ip ← W_v of the same cross-attention layer (the official script's initialisation)."""
    with torch.no_grad():
        for k, layer in processor_table(unet).items():
            branch = adapter.ip_adapter[str(k)]
            branch.to_k_ip.weight.copy_(layer.to_k.weight)
            branch.to_v_ip.weight.copy_(layer.to_v.weight)


@torch.no_grad()
def image_embeddings(encoder, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the encoder's image_embeds [N, D], through the same preprocess as `editlab style`."""
    out = []
    for part in images.split(chunk):
        pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in part]  # [3, H, W] -> [H, W, 3]
        out.append(encoder(preprocess(pil, encoder.config.image_size)))
    return torch.cat(out)


def adapter_loss(model: StableDiffusion, adapter: IPAdapter, means: torch.Tensor, stds: torch.Tensor,
                 contexts: torch.Tensor, caption_ids: torch.Tensor, embeds: torch.Tensor, recipe: AdapterRecipe):
    """The step's loss (module docstring). ``contexts``: the frozen text encoder's states of every distinct
    caption [K, 77, C], row 0 being the empty caption; ``caption_ids`` [N] index it; ``embeds`` [N, D]."""
    alphas_cumprod = noise_schedule_of(model).alphas_cumprod
    names = list(adapter.index)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(means), (recipe.batch,), generator=generator)
        z0 = model.vae.scale_latents(means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator))
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(len(alphas_cumprod), (recipe.batch,), generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        u = torch.rand(recipe.batch, generator=generator)
        no_text = u < recipe.p_text + recipe.p_both  # [0, p_text + p_both): text dropped
        no_image = (u >= recipe.p_text) & (u < recipe.p_text + recipe.p_both + recipe.p_image)  # overlap: both
        context = contexts[torch.where(no_text, 0, caption_ids[pick])]
        image = torch.where(no_image[:, None], 0.0, embeds[pick])  # dropped image: zeros, c_ip^∅ = proj(0)
        hook = ImagePromptHook(adapter, adapter.image_proj(image), {name: 1.0 for name in names})
        with attached(model.unet, hook, names):
            prediction = model.unet(x_t, t, context)
        return ((prediction - noise) ** 2).mean()  # ‖ε − ε_θ(x_t, t, c_t, c_i)‖²

    return loss_fn


def train_toy_ip_adapter(out: Path, toy_weights: Path, encoder, toy_clip: Path, recipe: AdapterRecipe = AdapterRecipe(),
                         resume: bool = False, stop_at: int | None = None) -> Path:
    """Train the toy adapter into folder ``out`` (checkpoint ip-adapter-checkpoint.pt) with ``encoder``, the
    image tower of ``toy_clip`` (weights_convert.clip_vision.load_image_encoder); writes
    out/toy-ip-adapter.safetensors, naming that file and the base model in the metadata."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = StableDiffusion.load(toy_weights).requires_grad_(False).eval()
    encoder = encoder.float().eval()
    images, captions = render_pool(dataclasses.replace(ToyRecipe(), pool=recipe.pool, data_seed=recipe.data_seed))
    means, stds = encode_pool(model, images)
    distinct = [""] + sorted(set(captions))
    with torch.no_grad():
        contexts = torch.cat([model.encode_prompt(distinct[i:i + 64]) for i in range(0, len(distinct), 64)])
    caption_ids = torch.tensor([distinct.index(c) for c in captions])
    embeds = image_embeddings(encoder, images)
    torch.manual_seed(recipe.seed)  # initialisation of the projection
    adapter = IPAdapter(model.unet, embed_dim=embeds.shape[1], n_tokens=recipe.n_tokens)
    init_from_text_branch(adapter, model.unet)
    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup=min(recipe.warmup, recipe.steps // 10),
                      seed=recipe.seed, checkpoint_every=100)
    loss_fn = adapter_loss(model, adapter, means, stds, contexts, caption_ids, embeds, recipe)
    checkpoint = out / "ip-adapter-checkpoint.pt"
    trainer = Trainer(adapter, loss_fn, cfg, checkpoint, "toy IP-Adapter")
    losses = trainer.run(resume=resume and checkpoint.is_file(), stop_at=stop_at)
    if trainer.step < recipe.steps:
        return checkpoint
    meta = {"recipe": IP_ADAPTER_RECIPE, "recipe_settings": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
            "image_encoder": toy_clip.name, "image_encoder_sha256": file_sha256(toy_clip),
            "base": toy_weights.name, "base_sha256": file_sha256(toy_weights),
            "final_loss": f"{sum(losses[-100:]) / len(losses[-100:]):.5f}"}
    path = out / "toy-ip-adapter.safetensors"
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=dict(sorted(meta.items())))
    log.info("toy IP-Adapter: %d steps, final loss %s", len(losses), meta["final_loss"])
    return path
