"""The one attention module of the UNet (and of the VAE's middle block), with two paths.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V            (*Attention Is All You Need*, eq. 1)

- Fast path: ``torch.nn.functional.scaled_dot_product_attention``. Used whenever no hook needs the
  probabilities. It never materialises the probability matrix.
- Explicit path: the formula above written out, over chunks of queries (``query_chunk`` rows at a time),
  with the scores and the softmax in fp32. Each chunk of probabilities ``[B, heads, chunk, K]`` is handed to
  the hooks before it multiplies V, so a hook can read or replace it and a full 4096×4096 map of a 64² layer
  is never held at once (docs/performance.md §1).

Hooks are how every method talks to attention (Prompt-to-Prompt controllers, attention stores, IP-Adapter's
image branch). A hook is any object with some of these methods::

    wants_probabilities(layer) -> bool            # put this layer on the explicit path
    edit_probabilities(layer, probs, rows) -> probs   # probs: [B, heads, len(rows), K], rows: a slice of queries
    extra_output(layer, q, attend) -> Tensor | None   # added to the attention output (before to_out);
                                                  # q: [B, heads, N, d]; attend(q, k, v) runs the fast kernel

All of it is differentiable, so gradient-based methods (null-text inversion, Visii) optimise through hooks.
Each layer has a stable readable ``name`` -- ``"{part}.{level}.{block}.{kind}"`` such as ``"down.1.0.cross"``,
``"mid.0.0.self"`` or ``"up.2.1.cross"`` (``up`` levels are numbered deepest first, as diffusers' up_blocks)
-- and methods select layers by it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention over tokens ``x`` (self) or ``x`` attending to ``context`` (cross).

    Parameter names follow diffusers (to_q, to_k, to_v, to_out.0) so that converted weights load strictly.
    """

    def __init__(self, query_dim: int, n_heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False, upcast: bool = False, name: str = "", level: int = 0):
        super().__init__()
        inner = n_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # diffusers keeps a dropout at index 1
        self.n_heads, self.head_dim, self.scale = n_heads, head_dim, head_dim ** -0.5
        self.upcast = upcast  # compute scores and softmax in fp32 on the explicit path (SD 2.1)
        self.name, self.level = name, level  # level: the UNet level (query maps are latent / 2**level)
        self.kind = "cross" if context_dim is not None else "self"
        self.hooks: list = []
        self.query_chunk = 1024  # rows of Q per chunk on the explicit path

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        # every hook is asked (no short-circuit): controllers count the layers they are offered
        if any([getattr(h, "wants_probabilities", lambda layer: False)(self) for h in self.hooks]):
            out = self._explicit(q, k, v)
        else:
            out = self.attend(q, k, v)
        for hook in self.hooks:
            extra = getattr(hook, "extra_output", None)
            extra = extra(self, q, self.attend) if extra else None
            if extra is not None:
                out = out + extra
        return self.to_out[0](self._merge_heads(out))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fast kernel: softmax(Q Kᵀ/√d) V without materialising the probabilities."""
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        editors = [h for h in self.hooks if hasattr(h, "edit_probabilities")]
        k_t = k.transpose(-1, -2).float()
        chunks = []
        for start in range(0, q.shape[2], self.query_chunk):
            rows = slice(start, min(start + self.query_chunk, q.shape[2]))
            scores = (q[:, :, rows].float() @ k_t) * self.scale  # [B, heads, chunk, K]
            probs = scores.softmax(dim=-1)
            for hook in editors:
                probs = hook.edit_probabilities(self, probs, rows)
            chunks.append(probs.to(v.dtype) @ v)
        return torch.cat(chunks, dim=2)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, N, h*d] -> [B, h, N, d]

    def _merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)  # [B, h, N, d] -> [B, N, h*d]


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every named attention layer of a model, in call order for the UNet (down, mid, up)."""
    return {m.name: m for m in model.modules() if isinstance(m, Attention) and m.name}


@contextlib.contextmanager
def attached(model: nn.Module, hook, select: Callable[[Attention], bool] | Iterable[str] | None = None):
    """Attach ``hook`` to the selected attention layers for the duration of a ``with`` block.

    ``select`` is a predicate on the layer, a collection of layer names, or None for every layer. A name
    that matches no layer is an error (a silent no-op is how hooks rot: docs/methods.md §1.6 item 3, §9.3).
    """
    layers = attention_layers(model)
    if select is None:
        chosen = list(layers.values())
    elif callable(select):
        chosen = [layer for layer in layers.values() if select(layer)]
    else:
        names = list(select)
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise ValueError(f"no attention layer named {unknown}; the model has {list(layers)}")
        chosen = [layers[n] for n in names]
    for layer in chosen:
        layer.hooks.append(hook)
    try:
        yield chosen
    finally:
        for layer in chosen:
            layer.hooks.remove(hook)
