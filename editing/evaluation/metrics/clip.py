"""CLIP scores (*Learning Transferable Visual Models From Natural Language Supervision*, Radford et al., 2021),
from an open_clip model the user gives (ldm/clip_models.py loads it; nothing is downloaded). Features
are the pooled, projected embeddings, made unit length: e(x) = E(x)/‖E(x)‖. Images reach CLIP resized to its
input size (clip_models.clip_image_features; for square images the same as resize + centre crop).

- CLIP score (PIE-Bench's "CLIP Whole", torchmetrics CLIPScore): 100·max(e_I(image)·e_T(target prompt), 0).
- Edited-region CLIP score: the same on the edit region only. PIE-Bench (``compat``) blacks out everything but
  the region and scores the whole frame; the clean definition crops to the region's bounding box first
  (pixels outside the mask, inside the box, still black), so the score sees the region, not mostly black.
- InstructPix2Pix's directional similarity cos(e_I(out) − e_I(in), e_T(target) − e_T(source)) and image
  similarity e_I(in)·e_I(out) (metrics/clip_similarity.py of the paper's code, on [0, 1] images).
- MagicBrush's CLIP-I: e_I(output)·e_I(ground truth).
- Style (IP-Adapter, InstantStyle): e_I(output)·e_I(style image) against the CLIP score to the prompt; an
  image that copies the style image's content scores high on the first and low on the second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.clip_models import clip_image_features, clip_text_features


@torch.no_grad()
def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> unit embeddings [B, D] (float64 for stable cosines)."""
    return F.normalize(clip_image_features(model, images).double(), dim=-1)


@torch.no_grad()
def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    return F.normalize(clip_text_features(model, texts).double(), dim=-1)


def clip_score(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """100·max(cos, 0) of unit embeddings [D]."""
    return 100 * max(float(image_embedding @ text_embedding), 0.0)


def region_image(image: torch.Tensor, mask: torch.Tensor, compat: bool = False) -> torch.Tensor:
    """The image with everything outside ``mask`` black; cropped to the mask's bounding box unless ``compat``."""
    region = image * mask.to(image.dtype)
    if compat:
        return region
    rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
    return region[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def direction_similarity(source_image: torch.Tensor, output_image: torch.Tensor, source_text: torch.Tensor,
                         target_text: torch.Tensor) -> float:
    """cos(e_I(out) − e_I(in), e_T(target) − e_T(source)) of unit embeddings [D]."""
    return float(F.cosine_similarity((output_image - source_image)[None], (target_text - source_text)[None]))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a[None], b[None]))
