"""SDXL's conditioning (*SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis*,
Podell et al. 2023, §2.1-2.2): two text encoders, a pooled text embedding and micro-conditioning.

    c      = [CLIP-L_{11}(ids_L) ; bigG_{31}(ids_G)]          [B, 77, 768 + 1280]: each tower's penultimate
                                                             layer, before its final LayerNorm (§2.1)
    pooled = W_proj · LN(bigG_{32}(ids_G))[end token]         [B, 1280]
    ids    = (h_orig, w_orig, c_top, c_left, h_target, w_target)   six numbers (§2.2, "size" and
                                                             "crop" conditioning), each embedded by a
                                                             256-wide sinusoid inside the UNet

The UNet adds MLP([pooled; sinusoids]) to its time embedding (ldm/unet.py ``TextTime``). Defaults are
diffusers' ``StableDiffusionXLPipeline``: original and target size = the output size, crop (0, 0); the
negative branch uses the same six numbers. With guidance and *no* negative prompt, the negative context and
pooled embedding are zeros (the base model's ``force_zeros_for_empty_prompt``); an empty string ``""`` is
encoded like any prompt. The two tokenizers pad differently: CLIP-L with the end token, bigG with 0 ("!").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .unet import TextTime

if TYPE_CHECKING:
    from .model import StableDiffusion


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning, in pixels; None sizes mean the output size (diffusers' default)."""

    original_size: tuple[int, int] | None = None  # (H, W) of the training image before resizing
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the training crop
    target_size: tuple[int, int] | None = None  # (H, W) the model is asked to produce

    def time_ids(self, height: int, width: int) -> list[float]:
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        return [float(v) for v in (*original, *self.crop_top_left, *target)]

    def as_dict(self, height: int, width: int) -> dict:
        ids = self.time_ids(height, width)
        return {"original_size": ids[:2], "crop_top_left": ids[2:4], "target_size": ids[4:]}


def encode_prompt(model: "StableDiffusion", prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77, C_L + C_G], pooled [B, P]) of ``prompts`` through both text encoders."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    hidden_l, _ = model.text_encoder.penultimate_and_pooled(model.tokenizer(prompts).to(model.device))
    hidden_g, pooled = model.text_encoder_2.penultimate_and_pooled(model.tokenizer_2(prompts).to(model.device))
    return torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1), pooled  # [B, 77, C_L] ++ [B, 77, C_G]


def conditioning(model: "StableDiffusion", prompts: Sequence[str], negative: str | Sequence[str] | None,
                 guided: bool, height: int, width: int, micro: MicroConditioning | None = None
                 ) -> tuple[torch.Tensor, TextTime]:
    """(context, TextTime) for the UNet batch: [negative; prompts] under guidance, else prompts alone."""
    micro = micro or MicroConditioning()
    context, pooled = encode_prompt(model, prompts)
    ids = torch.tensor([micro.time_ids(height, width)] * len(prompts), dtype=context.dtype, device=model.device)
    if not guided:
        return context, TextTime(pooled, ids)
    if negative is None:  # force_zeros_for_empty_prompt: no negative prompt -> zero conditioning
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
        neg_context, neg_pooled = encode_prompt(model, negative)
    return torch.cat([neg_context, context]), TextTime(torch.cat([neg_pooled, pooled]), torch.cat([ids, ids]))
