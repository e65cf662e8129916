"""The CLIP ViT image tower with its projection (*Learning Transferable Visual Models From Natural Language
Supervision*, Radford et al.; ViT: *An Image is Worth 16x16 Words*, Dosovitskiy et al.), as IP-Adapter uses
it (OpenCLIP ViT-H/14, docs/checkpoints.md §9.2):

    h_0 = LN_pre([x_class; patches(x) W_patch] + E_pos)       patches: P×P, no bias
    h_l = h_{l−1} + MHA(LN1 h_{l−1});  h_l += MLP(LN2 h_l)     (no causal mask: every patch sees every patch)
    image_embeds = W_proj · LN_post(h_L[class token])

Parameter names follow transformers' ``CLIPVisionModelWithProjection`` (``vision_model.pre_layrnorm`` sic), so
its weights load unchanged. The encoder layers are ldm/clip.py's, with the causal mask taken out.

``preprocess`` is CLIPImageProcessor's default: RGB, bicubic resize of the shortest side to 224, centre crop
224, /255, CLIP mean/std (non-square images lose their borders: docs/methods.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .clip import CausalSelfAttention, EncoderLayer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Defaults: OpenCLIP ViT-H/14 (laion2B-s32B-b79K), IP-Adapter SD 1.5's image encoder (~632M parameters)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    n_layers: int = 32
    n_heads: int = 16
    mlp_dim: int = 5120
    projection_dim: int = 1024  # image_embeds width
    activation: str = "gelu"  # OpenCLIP: GELU; OpenAI CLIP: quick_gelu

    def __post_init__(self):
        assert self.activation in ("quick_gelu", "gelu"), f"unknown activation {self.activation!r}"
        assert self.width % self.n_heads == 0, "width must be divisible by n_heads"
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"

    @property
    def n_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token


def tiny_vision(width: int = 32, projection_dim: int = 24) -> VisionConfig:
    return VisionConfig(image_size=28, patch_size=14, width=width, n_layers=2, n_heads=4, mlp_dim=4 * width,
                        projection_dim=projection_dim)


class SelfAttention(CausalSelfAttention):
    """CLIP self-attention without the causal mask (the image tower attends over all patches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))  # [B, h, N, d] -> [B, N, C]


class VisionEncoderLayer(EncoderLayer):
    """ldm/clip.py's pre-norm block (same parameter names) with bidirectional attention."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)  # reads width, n_heads, mlp_dim, activation
        self.self_attn = SelfAttention(cfg.width, cfg.n_heads)


class CLIPVisionModelWithProjection(nn.Module):
    """pixels [B, 3, S, S] (``preprocess``ed) -> image_embeds [B, projection_dim]."""

    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        self.config = cfg
        vm = self.vision_model = nn.Module()
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        vm.embeddings.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        vm.embeddings.position_embedding = nn.Embedding(cfg.n_positions, cfg.width)
        vm.pre_layrnorm = nn.LayerNorm(cfg.width)
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList([VisionEncoderLayer(cfg) for _ in range(cfg.n_layers)])
        vm.post_layernorm = nn.LayerNorm(cfg.width)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last layer's tokens [B, 1 + patches, width] (transformers' last_hidden_state)."""
        vm, size = self.vision_model, self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels of shape {list(pixels.shape)}; expected [B, 3, {size}, {size}] (use preprocess)")
        emb = vm.embeddings
        patches = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, C, S/P, S/P] -> [B, N, C]
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        h = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight  # [B, 1 + N, C]
        h = vm.pre_layrnorm(h)
        for layer in vm.encoder.layers:
            h = layer(h)
        return h

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model.post_layernorm(self.hidden_states(pixels)[:, 0])  # the class token
        return self.visual_projection(pooled)  # image_embeds = W_proj · LN_post(h_L[cls])


def preprocess(images: Image.Image | list[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL image(s) -> pixels [B, 3, size, size], as CLIPImageProcessor: shortest side to ``size`` (bicubic),
    centre crop, /255, (x − mean)/std."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # transformers rounds the long side down
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        pixels = torch.from_numpy(array).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
        out.append(pixels)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (torch.stack(out) - mean) / std
