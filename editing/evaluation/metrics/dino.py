"""DINO ViT features (*Emerging Properties in Self-Supervised Vision Transformers*, Caron et al., ICCV 2021) for
two metrics, with the network built by timm and the weights read from the user's DINO checkpoint
(``dino_vitbase8_pretrain.pth`` for PIE-Bench, ``dino_deitsmall16_pretrain.pth`` for MagicBrush).

Structure distance (*Splicing ViT Features*, Tumanyan et al., 2022; PIE-Bench's "Structure"): the keys K of
the last block's attention ([N, D], heads concatenated, CLS included) give the self-similarity
S_ij = k_i·k_j / max(‖k_i‖‖k_j‖, 1e-8); the distance is mean_ij (S(x) − S(y))². Input: short side resized to
224, ImageNet normalisation. PIE-Bench applies that normalisation to 0–255 values instead of [0, 1]
(``compat``); the clean definition normalises [0, 1] images as the network was trained.

MagicBrush's DINO score: cosine of the CLS outputs, after Resize(256, bicubic) + CenterCrop(224) + ImageNet norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_dino(path: Path):
    """A timm VisionTransformer shaped after the checkpoint (width, patch size, depth) with its weights."""
    from timm.models.vision_transformer import VisionTransformer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dino {path}: no such file (a DINO ViT checkpoint, e.g. dino_vitbase8_pretrain.pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("teacher", state.get("state_dict", state))
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: not a DINO ViT state dict (no cls_token / patch_embed.proj.weight)")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    model = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                              num_heads=width // 64, num_classes=0, dynamic_img_size=True)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")},
                                                strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit a ViT of width {width}, patch {patch}, depth {depth} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


def _normalise(images: torch.Tensor, scale: float) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images * scale - mean) / std


def resize_short_side(images: torch.Tensor, size: int = 224, mode: str = "bilinear") -> torch.Tensor:
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    return F.interpolate(images, size=(round(height * scale), round(width * scale)), mode=mode,
                         align_corners=False, antialias=True)


@torch.no_grad()
def last_block_keys(model, images: torch.Tensor) -> torch.Tensor:
    """Keys of the last block's attention, heads concatenated: [B, N, D]."""
    captured = {}
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    qkv = captured["qkv"]  # [B, N, 3·D]
    batch, tokens, _ = qkv.shape
    return qkv.reshape(batch, tokens, 3, -1)[:, :, 1]  # [B, N, 3, D] -> keys [B, N, D]


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """S_ij = k_i·k_j / max(‖k_i‖‖k_j‖, 1e-8): [B, N, D] -> [B, N, N]."""
    norms = keys.norm(dim=-1, keepdim=True)
    return keys @ keys.transpose(1, 2) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)


def structure_distance(model, output: torch.Tensor, source: torch.Tensor, compat: bool = False) -> float:
    """mean (S(output) − S(source))² of two [3, H, W] images in [0, 1]."""
    images = resize_short_side(torch.stack([output, source]).float())
    keys = last_block_keys(model, _normalise(images, 255.0 if compat else 1.0))
    sim = self_similarity(keys.double())
    return float(F.mse_loss(sim[0], sim[1]))


@torch.no_grad()
def dino_cls(model, images: torch.Tensor) -> torch.Tensor:
    """CLS outputs [B, D] after MagicBrush's Resize(256, bicubic) + CenterCrop(224) + ImageNet norm."""
    x = resize_short_side(images.float(), 256, "bicubic")
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return model.forward_features(_normalise(x, 1.0))[:, 0]


def dino_similarity(model, output: torch.Tensor, target: torch.Tensor) -> float:
    features = dino_cls(model, torch.stack([output, target]))
    return float(F.cosine_similarity(features[0:1].double(), features[1:2].double()))
