"""SDXL's conditioning (*SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis*,
Podell et al. 2023, §2.1-2.2): two text encoders, a pooled text embedding and micro-conditioning.

    c      = [CLIP-L_{11}(ids_L) ; bigG_{31}(ids_G)]          [B, 77, 768 + 1280]: each tower's penultimate
                                                             layer, before its final LayerNorm (§2.1)
    pooled = W_proj · LN(bigG_{32}(ids_G))[end token]         [B, 1280]
    ids    = (h_orig, w_orig, c_top, c_left, h_target, w_target)   six numbers (§2.2, "size" and
                                                             "crop" conditioning), each embedded by a
                                                             256-wide sinusoid inside the UNet

The refiner (the paper's refinement stage) has bigG alone (context = its penultimate states, 1280 wide) and
five numbers, ``(h_orig, w_orig, c_top, c_left, aesthetic score)``: an aesthetic score replaces the target
size, 6.0 for the prompt and 2.5 for the negative branch by default (diffusers' ``StableDiffusionXLImg2ImgPipeline``
with ``requires_aesthetics_score``). Its negative branch keeps the original size but takes the crop (0, 0)
(that pipeline's default ``negative_crops_coords_top_left``), and an absent negative prompt is encoded as
``""`` (no zeroing). editlab gives each row its own branch's numbers; diffusers repeats its [negative; prompt]
pair of rows B times, so for B > 1 prompts its rows get the two scores alternately.

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
    target_size: tuple[int, int] | None = None  # (H, W) the model is asked to produce (base model)
    aesthetic_score: float = 6.0  # refiner: the score the prompt branch asks for ...
    negative_aesthetic_score: float = 2.5  # ... and the negative branch

    def time_ids(self, height: int, width: int, aesthetic: float | None = None,
                 crop: tuple[int, int] | None = None) -> list[float]:
        """The base model's six numbers, or with ``aesthetic`` the refiner's five (the score last)."""
        original = self.original_size or (height, width)
        last = (aesthetic,) if aesthetic is not None else (self.target_size or (height, width))
        return [float(v) for v in (*original, *(self.crop_top_left if crop is None else crop), *last)]

    def as_dict(self, height: int, width: int, refiner: bool = False) -> dict:
        ids = self.time_ids(height, width)
        if refiner:
            return {"original_size": ids[:2], "crop_top_left": ids[2:4], "aesthetic_score": self.aesthetic_score,
                    "negative_aesthetic_score": self.negative_aesthetic_score}
        return {"original_size": ids[:2], "crop_top_left": ids[2:4], "target_size": ids[4:]}


def encode_prompt(model: "StableDiffusion", prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77, C_L + C_G], pooled [B, P]) of ``prompts`` through both text encoders."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if model.is_sdxl_refiner:  # bigG alone
        return model.text_encoder.penultimate_and_pooled(model.tokenizer(prompts).to(model.device))
    hidden_l, _ = model.text_encoder.penultimate_and_pooled(model.tokenizer(prompts).to(model.device))
    hidden_g, pooled = model.text_encoder_2.penultimate_and_pooled(model.tokenizer_2(prompts).to(model.device))
    return torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1), pooled  # [B, 77, C_L] ++ [B, 77, C_G]


def conditioning(model: "StableDiffusion", prompts: Sequence[str], negative: str | Sequence[str] | None,
                 guided: bool, height: int, width: int, micro: MicroConditioning | None = None
                 ) -> tuple[torch.Tensor, TextTime]:
    """(context, TextTime) for the UNet batch: [negative; prompts] under guidance, else prompts alone."""
    micro = micro or MicroConditioning()
    refiner = model.is_sdxl_refiner
    context, pooled = encode_prompt(model, prompts)

    def ids_for(aesthetic: float, crop: tuple[int, int] | None = None) -> torch.Tensor:
        row = micro.time_ids(height, width, aesthetic if refiner else None, crop)
        return torch.tensor([row] * len(prompts), dtype=context.dtype, device=model.device)

    ids = ids_for(micro.aesthetic_score)
    if not guided:
        return context, TextTime(pooled, ids)
    # the base model's negative branch: the same six numbers; the refiner's: its own score, crop (0, 0)
    negative_ids = ids_for(micro.negative_aesthetic_score, (0, 0) if refiner else None)
    if negative is None and refiner:  # the refiner does not zero: it encodes ""
        negative = ""
    if negative is None:  # force_zeros_for_empty_prompt: no negative prompt -> zero conditioning
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
        neg_context, neg_pooled = encode_prompt(model, negative)
    return torch.cat([neg_context, context]), TextTime(torch.cat([neg_pooled, pooled]), torch.cat([negative_ids, ids]))
