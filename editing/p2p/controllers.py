"""Prompt-to-Prompt attention controllers (Hertz et al., *Prompt-to-Prompt Image Editing with Cross Attention
Control*, ICLR 2023, §3.2; docs/methods.md §1.1).

The UNet runs on [∅ × B; P_0 … P_{B−1}] (row 0 of the conditional half is the source). In each layer the
controller edits the conditional rows only; the unconditional rows and the source row pass unchanged:

    cross-attention   A_j ← α_j(i)·E(A_0, A_j) + (1 − α_j(i))·A_j     per token, α from schedules.py
    self-attention    A_j ← A_0      for calls in the self range, in layers at level ≥ ``self_min_level``

with the edit function E one of (A_0: [heads, Q, K], A_j: [heads, Q, K]):

    Replace (word swap)    E[:, :, n] = Σ_w A_0[:, :, w]·M_j[w, n]          M_j from alignment.replacement_mapper
    Refine (added words)   E[:, :, n] = A_0[:, :, m_j(n)] if n is aligned, else A_j[:, :, n]
    Reweight (equalizer)   E = E_prev(A_0, A_j)·e_j[n]     E_prev a chained Replace/Refine, else A_0;
                           no renormalisation, negative weights allowed

Only the layers whose maps are edited or stored per token (cross-attention, K = 77) run the explicit
(query-chunked) attention path (docs/performance.md §1). Self-attention replacement keeps the fused kernel: the
edited rows' output A_0 V_j = softmax(q_0 k_0ᵀ/√d) V_j is scaled_dot_product_attention(q_0, k_0, V_j)
(``map_sources``), so the 4096×4096 maps of a 64² layer are never formed. Every layer the controller is attached
to must run once per step (the layer-count contract of ldm.hooks): a hook that silently reaches no layer edits
nothing, which is how the public code broke (docs/methods.md §1.6 item 3).
"""

from __future__ import annotations

import torch

from ldm.hooks import AttentionHook, guidance_rows

from .local_blend import LocalBlend
from .store import AttentionStore


class Replace:
    """Word swap: E = A_0 · M_j for every edited prompt j."""

    def __init__(self, mappers: torch.Tensor):
        self.mappers = mappers  # [B−1, K, K]

    def to(self, device) -> "Replace":
        return Replace(self.mappers.to(device))

    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        # E[j, h, q, n] = Σ_w A_0[h, q, w] M_j[w, n]   ([heads, q, K], [B−1, K, K] -> [B−1, heads, q, K])
        return torch.einsum("hqw,bwn->bhqn", source, self.mappers.to(source))


class Refine:
    """Added phrase: aligned target tokens take the source token's map, new tokens keep their own."""

    def __init__(self, mappers: torch.Tensor, aligned: torch.Tensor):
        self.mappers, self.aligned = mappers, aligned  # [B−1, K] long, [B−1, K] in {0, 1}

    def to(self, device) -> "Refine":
        return Refine(self.mappers.to(device), self.aligned.to(device))

    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        taken = source[:, :, self.mappers].permute(2, 0, 1, 3)  # [heads, q, B−1, K] -> [B−1, heads, q, K]
        aligned = self.aligned.to(source)[:, None, None, :]
        return taken * aligned + edited * (1 - aligned)


class Reweight:
    """Equalizer: scale each token's map by e_j[n], after an optional Replace or Refine."""

    def __init__(self, scale: torch.Tensor, previous: Replace | Refine | None = None):
        self.scale, self.previous = scale, previous  # [B−1, K]

    def to(self, device) -> "Reweight":
        return Reweight(self.scale.to(device), self.previous.to(device) if self.previous is not None else None)

    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        base = self.previous(source, edited) if self.previous is not None else source.expand_as(edited)
        return base * self.scale.to(source)[:, None, None, :]


class P2PController(AttentionHook):
    """The Prompt-to-Prompt attention hook and step hook for one sampling run of B prompts (row 0 = source).

    :param cross_edit: Replace, Refine or Reweight (None: cross-attention is not edited)
    :param cross_alphas: α [N, B−1, K] (schedules.cross_replace_alphas)
    :param self_calls: calls i that replace self-attention (schedules.self_replace_calls)
    :param self_min_level: self-attention is replaced in layers whose level is ≥ this
    :param store: optional AttentionStore (visualisation, local blending); sees the edited maps
    :param blend: optional LocalBlend, applied after each sampler step (needs the store)
    """

    def __init__(self, n_prompts: int, cross_edit=None, cross_alphas: torch.Tensor | None = None,
                 self_calls: range = range(0), self_min_level: int = 0, store: AttentionStore | None = None,
                 blend: LocalBlend | None = None):
        if cross_edit is not None and cross_alphas is None:
            raise ValueError("a cross-attention edit needs its α schedule (cross_alphas)")
        if n_prompts < 2 and (cross_edit is not None or len(self_calls) > 0 or blend is not None):
            raise ValueError("Prompt-to-Prompt edits need a source and at least one edited prompt")
        if blend is not None and (store is None or blend.level not in store.levels):
            raise ValueError("local blending needs an AttentionStore that keeps the blend level's maps")
        self.n_prompts, self.cross_edit, self.cross_alphas = n_prompts, cross_edit, cross_alphas
        self.cross_active = [] if cross_alphas is None else cross_alphas.flatten(1).any(dim=1).tolist()
        self.self_calls, self.self_min_level = self_calls, self_min_level
        self.store, self.blend = store, blend
        self.step = 0
        self.calls_per_step: list[int] = []  # attached layers that ran, per step (each once: ldm.hooks)
        self.explicit_per_step: list[list[str]] = []  # attached layers on the explicit path, per step
        self.replaced_per_step: list[list[str]] = []  # attached layers whose maps A_j ← A_0, per step
        self.device = torch.device("cpu")
        self._sources: dict[int, torch.Tensor] = {}  # batch rows -> map_sources (on self.device)

    def _edits_cross(self, layer) -> bool:
        return layer.kind == "cross" and self.cross_edit is not None and self.cross_active[self.step]

    def _edits_self(self, layer) -> bool:
        return layer.kind == "self" and self.step in self.self_calls and layer.level >= self.self_min_level

    def to(self, device) -> "P2PController":
        """Move the edit tensors to the model's device once (not on every attention chunk)."""
        self.device, self._sources = torch.device(device), {}
        if self.cross_edit is not None:
            self.cross_edit, self.cross_alphas = self.cross_edit.to(device), self.cross_alphas.to(device)
        if self.blend is not None:
            self.blend.token_masks = self.blend.token_masks.to(device)
        return self

    # --- step hook ---------------------------------------------------------------------------------------
    def begin_step(self, i: int, t) -> None:
        super().begin_step(i, t)
        self.step = i

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        latents = super().end_step(i, t, latents)  # every attached layer ran once in this step
        if self.attachment is not None:
            layers = self.attachment.layers
            self.calls_per_step.append(self.attachment.seen[-1])
            self.explicit_per_step.append([layer.name for layer in layers if self.wants_probabilities(layer)])
            self.replaced_per_step.append([layer.name for layer in layers if self._edits_self(layer)])
        if self.store is not None:
            self.store.end_step(i, t, latents)
        if self.blend is not None:
            latents = self.blend(i, latents, self.store.summed_maps(self.blend.level))
        return latents

    # --- attention hook ---------------------------------------------------------------------------------
    def wants_probabilities(self, layer) -> bool:
        return self._edits_cross(layer) or (self.store is not None and self.store.wants(layer))

    def map_sources(self, layer, n_rows: int) -> torch.Tensor | None:
        """Self-attention in the self range: every edited conditional row takes the source row's map."""
        if not self._edits_self(layer):
            return None
        if n_rows not in self._sources:
            _, cond = guidance_rows(n_rows, self.n_prompts)
            sources = torch.arange(n_rows)
            sources[cond.start + 1:cond.stop] = cond.start  # A_j ← A_0; uncond rows and the source unchanged
            self._sources[n_rows] = sources.to(self.device)
        return self._sources[n_rows]

    def edit_probabilities(self, layer, probs: torch.Tensor, rows: slice) -> torch.Tensor:
        edits, stores = self._edits_cross(layer), self.store is not None and self.store.wants(layer)
        if not (edits or stores):
            return probs
        uncond, cond = guidance_rows(probs.shape[0], self.n_prompts)
        if edits:
            source, edited = probs[cond.start:cond.start + 1], probs[cond.start + 1:cond.stop]  # [rows, heads, q, K]
            alpha = self.cross_alphas[self.step].to(probs)[:, None, None, :]  # [B−1, K] -> [B−1, 1, 1, K]
            edited = alpha * self.cross_edit(source[0], edited) + (1 - alpha) * edited
            probs = torch.cat([probs[uncond], source, edited])
        if stores:
            self.store.add(layer, probs[cond], rows)
        return probs
