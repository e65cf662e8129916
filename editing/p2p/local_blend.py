"""Local blending: edit only where the chosen words attend (Prompt-to-Prompt, Hertz et al., §3.2 "local
editing"; google/prompt-to-prompt ``LocalBlend``, docs/methods.md §1.4).

After every sampler step i (from ``start_step`` on), with M_b the running sum of prompt b's cross-attention
maps at the blend level (heads and layers averaged) and w_b the tokens of its blend words:

    m_b   = Σ_{n ∈ w_b} M_b[:, :, n]                          word map       [h, w]
    m_b   = maxpool_3×3(m_b), upsampled (nearest) to the latent size
    mask_b = m_b / max(m_b) > threshold                        (0.3)
    x_j  ← x_0 + (mask_0 ∨ mask_j)·(x_j − x_0)                 for every edited row j

The union is a logical OR: in the overlap the factor is 1, never 2 (adding the masks as numbers would
extrapolate past x_j: docs/methods.md §1.4). A prompt without any blend word contributes an empty mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalBlend:
    def __init__(self, token_masks: torch.Tensor, level: int, threshold: float = 0.3, start_step: int = 0):
        """token_masks [B, K]: 1 on the tokens of each prompt's blend words; level: the UNet level whose
        stored maps make the mask; start_step: first step index that blends (the NTI notebook: ⌊0.2·N⌋)."""
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"blend threshold must lie in [0, 1), got {threshold}")
        self.token_masks = token_masks.float()
        self.level, self.threshold, self.start_step = level, threshold, start_step

    def masks(self, maps: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-prompt masks: maps [B, h, w, K] -> bool [B, 1, H, W] at the latent size."""
        words = (maps * self.token_masks.to(maps)[:, None, None, :]).sum(dim=-1)  # [B, h, w, K] -> [B, h, w]
        words = F.max_pool2d(words[:, None], kernel_size=3, stride=1, padding=1)  # [B, 1, h, w]
        words = F.interpolate(words, size=tuple(latent_hw), mode="nearest")  # [B, 1, H, W]
        peak = words.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(words.dtype).tiny)
        return words / peak > self.threshold

    def __call__(self, i: int, latents: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Blend the edited rows of ``latents`` [B, C, H, W] into the source row outside the union mask."""
        if i < self.start_step:
            return latents
        masks = self.masks(maps, latents.shape[-2:])
        union = masks[:1] | masks[1:]  # logical OR: 0 or 1   [B−1, 1, H, W]
        source = latents[:1]
        edited = source + union.to(latents.dtype) * (latents[1:] - source)  # x_0 + mask·(x_j − x_0)
        return torch.cat([source, edited])
