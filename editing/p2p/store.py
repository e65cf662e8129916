"""Attention store: running sums of cross-attention maps for visualisation and local blending.

As google/prompt-to-prompt's ``AttentionStore`` (docs/methods.md §1.5), reduced before storing
(docs/performance.md §1): only cross-attention, only the conditional rows, averaged over heads, at the chosen
UNet levels, summed over steps. Self-attention maps (up to 4096×4096 at 64²) are never stored; a stored layer
costs B·Q·77 numbers however many steps run.

    sum_ℓ   = Σ_i mean_heads A_i^ℓ            [B, Q_ℓ, 77] per layer ℓ
    maps(L) = mean_{ℓ at level L} sum_ℓ / steps   [B, h_L, w_L, 77]

Maps arrive in query chunks (the explicit attention path, ldm/attention.py), so the full map of a layer is
never materialised at once; each chunk is added into its rows of the sum.

With ``keep_steps`` the store also keeps each step's own maps (``step_maps``: the map of step i alone, not the
running mean), so a viewer can show the attention at any denoising step; that costs steps × the memory above.

The store sees maps as the model uses them, after any Prompt-to-Prompt edit of the same call. It works alone
as an attention hook and a step hook (``attached(unet, store)`` + ``text_to_image(..., hooks=[store])``), or
inside a ``P2PController``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ldm.hooks import AttentionHook, guidance_rows

from .schedules import level_shape


class AttentionStore(AttentionHook):
    def __init__(self, n_prompts: int, latent_hw: tuple[int, int], levels: Iterable[int], keep_steps: bool = False):
        self.n_prompts = n_prompts
        self.latent_hw = tuple(latent_hw)
        self.levels = frozenset(levels)
        self.sums: dict[str, torch.Tensor] = {}  # layer name -> [B, Q, K]
        self.layer_levels: dict[str, int] = {}
        self.steps = 0
        self.keep_steps = keep_steps
        self._this_step: dict[str, torch.Tensor] = {}  # layer name -> [B, Q, K] of the running step (keep_steps)
        self._per_step: list[dict[str, torch.Tensor]] = []  # one finished step's maps per entry (keep_steps)

    def wants(self, layer) -> bool:
        return layer.kind == "cross" and layer.level in self.levels

    def add(self, layer, cond_probs: torch.Tensor, rows: slice) -> None:
        """Add one query chunk of the conditional rows' probabilities [B, heads, q, K] to the layer's sum."""
        chunk = cond_probs.detach().float().mean(dim=1)  # [B, heads, q, K] -> [B, q, K]
        if layer.name not in self.sums:
            height, width = level_shape(self.latent_hw, layer.level)
            self.sums[layer.name] = chunk.new_zeros(chunk.shape[0], height * width, chunk.shape[-1])
            self.layer_levels[layer.name] = layer.level
        self.sums[layer.name][:, rows] += chunk  # our own buffer; the caller's tensor is untouched
        if self.keep_steps:
            if layer.name not in self._this_step:
                self._this_step[layer.name] = torch.zeros_like(self.sums[layer.name])
            self._this_step[layer.name][:, rows] = chunk

    def finish_step(self) -> None:
        """Count one step (called at the end of each sampler step); with ``keep_steps`` keep its maps."""
        self.steps += 1
        if self.keep_steps:
            self._per_step.append(self._this_step)
            self._this_step = {}

    def summed_maps(self, level: int) -> torch.Tensor:
        """Mean over the level's layers of the running sums: [B, h, w, K] (LocalBlend normalises by the max,
        so sum and mean give the same mask)."""
        return self._level_mean(self.sums, level)

    def _level_mean(self, sums: dict[str, torch.Tensor], level: int) -> torch.Tensor:
        names = [name for name, lv in self.layer_levels.items() if lv == level]
        if not names:
            raise ValueError(f"no cross-attention maps were stored at UNet level {level} (stored levels: "
                             f"{sorted(set(self.layer_levels.values()))}); choose a level with attention")
        height, width = level_shape(self.latent_hw, level)
        mean = torch.stack([sums[name] for name in names]).mean(dim=0)
        return mean.view(mean.shape[0], height, width, mean.shape[-1])  # [B, Q, K] -> [B, h, w, K]

    def step_maps(self, level: int) -> torch.Tensor:
        """Each step's own maps, averaged over heads and the level's layers: [steps, B, h, w, K]. Their mean
        over steps is ``average_maps`` (up to rounding)."""
        if not self.keep_steps:
            raise ValueError("this AttentionStore was made without keep_steps; it kept only the running sums")
        if not self._per_step:
            raise ValueError("no step has finished yet")
        return torch.stack([self._level_mean(step, level) for step in self._per_step])

    def average_maps(self, level: int) -> torch.Tensor:
        """Maps averaged over heads, layers of the level and steps: [B, h, w, K]."""
        return self.summed_maps(level) / max(self.steps, 1)

    # --- used alone as a hook -------------------------------------------------------------------------
    def wants_probabilities(self, layer) -> bool:
        return self.wants(layer)

    def edit_probabilities(self, layer, probs: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.wants(layer):
            self.add(layer, probs[guidance_rows(probs.shape[0], self.n_prompts)[1]], rows)
        return probs

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        latents = super().end_step(i, t, latents)  # attached alone: every attached layer ran once
        self.finish_step()
        return latents
