"""The two hook protocols every method talks through, written once, and the guidance row layout they share.

Step hooks run in the sampling loop (``ldm.pipeline.denoise``) around each sampler step; attention hooks run
inside every attention layer they are attached to (``ldm.attention.attached``). A method subclasses the base
class and overrides only what it needs: every method here defaults to "do nothing".

    StepHook.begin_step(i, t)                       before the UNet call of step i
    StepHook.end_step(i, t, latents) -> latents     after the sampler step (may change the latents)

    AttentionHook.wants_probabilities(layer) -> bool
        a pure question (asked zero or more times per call): does this hook need this layer's probability
        matrix? Yes puts the layer on the explicit path, which materialises it chunk by chunk.
    AttentionHook.map_sources(layer, n_rows) -> LongTensor [n_rows] | None
        replace whole maps: row r attends with the map of row ``sources[r]``, A_r ← A_sources[r]. Because
        A_s V_r = softmax(q_s k_sᵀ/√d) V_r, the layer computes it with the fused kernel on (q_s, k_s, V_r),
        without ever holding A_s.
    AttentionHook.edit_probabilities(layer, probs, rows) -> probs
        explicit path only: read or replace a chunk of probabilities [n_rows, heads, len(rows), K]
    AttentionHook.extra_output(layer, q, attend) -> Tensor | None
        added to the attention output before ``to_out`` (q: [n_rows, heads, N, d]; attend(q, k, v) is the
        fused kernel)

The layer-count contract: ``attached`` gives the hook an ``Attachment`` (the layers it is attached to); an
attention hook that is also passed to the sampling loop as a step hook checks, at the end of each step,
that every one of those layers ran exactly once -- a hook that silently reaches no layer, or a UNet called
twice in one step, is how attention-editing code rots. Subclasses that override ``begin_step`` or
``end_step`` call ``super()``.

The guidance rows: under classifier-free guidance one UNet call runs the batch ``[uncond × B; cond × B]``
(the unconditional copies of the B rows first, then the conditional ones, as diffusers); without guidance
it runs the B conditional rows alone. ``guidance_rows`` names that layout for every hook and predictor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .attention import Attention

LAYOUT = "[uncond × B; cond × B]"


def guidance_rows(n_rows: int, batch: int) -> tuple[slice, slice]:
    """(unconditional rows, conditional rows) of a UNet batch of ``n_rows`` that holds ``batch`` prompts:
    ``[uncond × B; cond × B]`` under guidance (n_rows = 2B), the conditional rows alone without (n_rows = B;
    the unconditional slice is then empty)."""
    if n_rows == 2 * batch:
        return slice(0, batch), slice(batch, 2 * batch)
    if n_rows == batch:
        return slice(0, 0), slice(0, batch)
    raise ValueError(f"a UNet batch of {n_rows} rows for {batch} prompts; expected {LAYOUT} with B = {batch} "
                     f"(or the {batch} conditional rows alone)")


def guidance_batch(x: torch.Tensor) -> torch.Tensor:
    """The rows of one guided UNet call from B latents: [x; x] ([B, ...] -> [2B, ...], ``LAYOUT``)."""
    return torch.cat([x, x])


def join_guidance(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """[uncond × B; cond × B] from its two halves (contexts, image tokens, ControlNet residuals)."""
    return torch.cat([uncond, cond])


def split_guidance(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uncond, cond) halves of a guided UNet batch [2B, ...] -> 2 × [B, ...]."""
    if out.shape[0] % 2:
        raise ValueError(f"a guided batch has an even number of rows ({LAYOUT}); got {out.shape[0]}")
    uncond, cond = out.chunk(2)
    return uncond, cond


class StepHook:
    """Called by the sampling loop around each step; both methods default to doing nothing."""

    def begin_step(self, i: int, t) -> None:
        pass

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        return latents


class Attachment:
    """The layers ``attached`` gave a hook, and the check that each ran once per step (layers count their
    own calls, so the check needs nothing from the hook's questions)."""

    def __init__(self, layers: Sequence["Attention"]):
        self.layers = tuple(layers)
        self.marks = self._counts()
        self.seen: list[int] = []  # layer calls of each checked step

    def _counts(self) -> list[int]:
        return [layer.calls for layer in self.layers]

    def start_step(self) -> None:
        self.marks = self._counts()

    def check_step(self, i: int, who: str) -> int:
        """Raise unless every attached layer ran exactly once since the step began; returns the calls seen."""
        now = self._counts()
        ran = [n - m for n, m in zip(now, self.marks)]
        self.marks = now
        self.seen.append(sum(ran))
        if any(r != 1 for r in ran):
            raise RuntimeError(f"{who} saw {sum(ran)} attention layers in step {i}, expected {len(self.layers)}: "
                               "the UNet ran more than once per step or the hook did not reach every layer")
        return sum(ran)


class AttentionHook(StepHook):
    """Base class of every attention hook (see the module docstring); every method defaults to a no-op."""

    attachment: Attachment | None = None  # set by ldm.attention.attached while attached

    def wants_probabilities(self, layer: "Attention") -> bool:
        return False

    def map_sources(self, layer: "Attention", n_rows: int) -> torch.Tensor | None:
        return None

    def edit_probabilities(self, layer: "Attention", probs: torch.Tensor, rows: slice) -> torch.Tensor:
        return probs

    def extra_output(self, layer: "Attention", q: torch.Tensor, attend) -> torch.Tensor | None:
        return None

    # --- as a step hook: the layer-count contract -----------------------------------------------------
    def begin_step(self, i: int, t) -> None:
        if self.attachment is not None:
            self.attachment.start_step()

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        if self.attachment is not None:
            self.attachment.check_step(i, type(self).__name__)
        return latents
