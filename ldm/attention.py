"""The one attention module of the UNet (and of the VAE's middle block), with two paths.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V            (*Attention Is All You Need*, eq. 1)

- Fast path: ``torch.nn.functional.scaled_dot_product_attention``. Used whenever no hook needs the
  probabilities. It never materialises the probability matrix.
- Explicit path: the formula above written out, over chunks of queries (``query_chunk`` rows at a time),
  with the scores and the softmax in fp32. Each chunk of probabilities ``[B, heads, chunk, K]`` is handed to
  the hooks before it multiplies V, so a hook can read or replace it and a full 4096×4096 map of a 64² layer
  is never held at once (docs/performance.md §1).

Hooks are how every method talks to attention (Prompt-to-Prompt controllers, attention stores, IP-Adapter's
image branch): subclasses of ``ldm.hooks.AttentionHook``, whose methods default to no-ops. A layer takes

- the explicit path when some hook ``wants_probabilities`` (it reads or edits maps per token);
- else the fused kernel on gathered queries and keys when some hook gives ``map_sources`` (it only replaces
  whole maps, A_r ← A_s: softmax(q_s k_sᵀ/√d) V_r is ``scaled_dot_product_attention(q_s, k_s, V_r)``, exact
  without materialising A_s);
- else the fused kernel.

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

from .hooks import Attachment, AttentionHook


class Attention(nn.Module):
    """Multi-head attention over tokens ``x`` (self) or ``x`` attending to ``context`` (cross).

    Parameter names follow diffusers (to_q, to_k, to_v, to_out.0) so that converted weights load strictly.
    ``upcast`` (the checkpoint's ``upcast_attention``, SD 2.1): scores and softmax in fp32 on both paths,
    whatever the weights' dtype. The explicit path computes them in fp32 always: the maps it hands to hooks
    are edited, summed over steps and shown, so they are kept at full precision for every model; on the
    fused path an upcast layer runs the kernel on fp32 q, k, v and rounds only its output.
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
        self.upcast = upcast
        self.name, self.level = name, level  # level: the UNet level (query maps are latent / 2**level)
        self.kind = "cross" if context_dim is not None else "self"
        self.hooks: list[AttentionHook] = []
        self.query_chunk = 1024  # rows of Q per chunk on the explicit path
        self.calls = 0  # forward calls: the layer-count contract of ldm.hooks.Attachment reads it
        self.fuse = False  # one matrix product for Q, K, V (self) or K, V (cross); see fuse_projections
        self._fused: tuple | None = None  # (key of the weights it was built from, weight, bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        q, k, v = (self._split_heads(t) for t in self._project(x, context))
        sources = self._map_sources(q.shape[0])
        if any(hook.wants_probabilities(self) for hook in self.hooks):
            out = self._explicit(q, k, v, sources)
        elif sources is not None:
            out = self.attend(q[sources], k[sources], v)  # A_r ← A_s, A_s V_r = softmax(q_s k_sᵀ/√d) V_r
        else:
            out = self.attend(q, k, v)
        for hook in self.hooks:
            extra = hook.extra_output(self, q, self.attend)
            if extra is not None:
                out = out + extra
        return self.to_out[0](self._merge_heads(out))

    def fuse_projections(self, enabled: bool = True) -> None:
        """Compute Q, K, V of self-attention as [W_q; W_k; W_v]·x and K, V of cross-attention as
        [W_k; W_v]·c: one matrix product instead of three (two), the same numbers up to the GEMM's rounding.
        The stacked weight is built on first use and rebuilt whenever the weights change (loading, a dtype
        or device move, an in-place update); while a projection is trained the separate ones run, so
        gradients reach to_q, to_k, to_v as usual. The parameters (and the weights file) stay as they are."""
        self.fuse, self._fused = enabled, None

    def _project(self, x: torch.Tensor, context: torch.Tensor | None):
        linears = (self.to_k, self.to_v) if context is not None else (self.to_q, self.to_k, self.to_v)
        params = [p for linear in linears for p in linear.parameters()]
        if not self.fuse or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            source = x if context is None else context
            return self.to_q(x), self.to_k(source), self.to_v(source)
        if self._fused is None or self._fused[0] != self._weights_key(params):
            with torch.no_grad():
                weight = torch.cat([linear.weight for linear in linears])  # [(3 or 2)·h·d, C]
                bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
                self._share_storage(linears, weight, bias)
            self._fused = (self._weights_key(params), weight, bias)
        _, weight, bias = self._fused
        if context is None:
            return F.linear(x, weight, bias).chunk(3, dim=-1)  # [B, N, 3·h·d] -> 3 × [B, N, h·d]
        return (self.to_q(x), *F.linear(context, weight, bias).chunk(2, dim=-1))  # K, V: 2 × [B, L, h·d]

    @staticmethod
    def _weights_key(params) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)

    @staticmethod
    def _share_storage(linears, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Point each projection's parameters at its rows of the stacked ``weight`` (and ``bias``): the weights
        are then held once (SDXL's attention projections are 2.4 GB in fp32), and an in-place update of a
        projection is an update of the stacked matrix."""
        start = 0
        for linear in linears:
            rows = slice(start, start + linear.weight.shape[0])
            linear.weight.data = weight[rows]
            if bias is not None:
                linear.bias.data = bias[rows]
            start = rows.stop

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fast kernel: softmax(Q Kᵀ/√d) V without materialising the probabilities."""
        if self.upcast and q.dtype != torch.float32:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=self.scale).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)

    def _map_sources(self, n_rows: int) -> torch.Tensor | None:
        """Row r's map is row sources[r]'s: the hooks' replacements composed in attachment order."""
        sources = None
        for hook in self.hooks:
            mine = hook.map_sources(self, n_rows)
            if mine is not None:
                sources = mine if sources is None else sources[mine]  # later hooks see earlier replacements
        return None if sources is None else sources.to(self.to_q.weight.device)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sources: torch.Tensor | None) -> torch.Tensor:
        k_t = k.transpose(-1, -2).float()
        chunks = []
        for start in range(0, q.shape[2], self.query_chunk):
            rows = slice(start, min(start + self.query_chunk, q.shape[2]))
            scores = (q[:, :, rows].float() @ k_t) * self.scale  # [B, heads, chunk, K]
            probs = scores.softmax(dim=-1)
            if sources is not None:
                probs = probs[sources]  # A_r ← A_sources[r], before any hook reads or edits the maps
            for hook in self.hooks:
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
def attached(model: nn.Module, hook: AttentionHook,
             select: Callable[[Attention], bool] | Iterable[str] | None = None):
    """Attach ``hook`` to the selected attention layers for the duration of a ``with`` block; yields them.

    ``select`` is a predicate on the layer, a collection of layer names, or None for every layer. A name
    that matches no layer is an error: a hook that silently reaches no layer changes nothing and says nothing
    (docs/methods.md §1.6 item 3). The hook gets the ``Attachment`` of these layers (ldm.hooks: each must run
    once per sampling step).
    """
    if not isinstance(hook, AttentionHook):
        raise TypeError(f"{type(hook).__name__} is not an attention hook; subclass ldm.hooks.AttentionHook")
    if hook.attachment is not None:
        raise ValueError(f"this {type(hook).__name__} is already attached; attach each hook once")
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
    hook.attachment = Attachment(chosen)
    try:
        yield chosen
    finally:
        hook.attachment = None
        for layer in chosen:
            layer.hooks.remove(hook)
