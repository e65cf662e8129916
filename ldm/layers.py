"""Building blocks shared by the UNet, the VAE and the ControlNet: normalisation, ResBlocks, resampling,
the timestep embedding and the spatial transformer.

Numerical conventions (docs/checkpoints.md §13): GroupNorm eps 1e-5 in UNet ResBlocks and 1e-6 in the spatial
transformers and everywhere in the VAE, always computed in fp32 (LDM ``GroupNorm32``); exact GELU in GEGLU.
Parameter names follow diffusers, so converted weights load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (fp16 overflows otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f_i), sin(t·f_i)], f_i = exp(−ln(max_period)·i/(dim/2)), i < dim/2.

    The cos-first order is LDM's (diffusers: flip_sin_to_cos=True, freq_shift=0). t may be fractional
    (Euler samplers interpolate timesteps).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B] -> [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """emb = Linear(SiLU(Linear(sinusoid(t))))."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        sinusoid = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class ResBlock(nn.Module):
    """h = conv2(SiLU(norm2(conv1(SiLU(norm1 x)) + Linear(SiLU(emb))))); out = shortcut(x) + h.

    Without a time embedding (``embed_dim=None``) this is the VAE's ResNet block.
    """

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_ch) if embed_dim else None
        self.norm2 = GroupNorm32(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3×3 conv. The UNet pads symmetrically (1 on every side); the VAE pads (0, 1, 0, 1) -- right
    and bottom only -- with no conv padding, as its weights were trained (TF "SAME"; docs/checkpoints.md §13)."""

    def __init__(self, channels: int, asymmetric_pad: bool):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """GEGLU(x) = (xW + b) · GELU(xV + c): one projection to 2·inner, value first, gate second."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)."""

    def __init__(self, dim: int, n_heads: int, context_dim: int, upcast: bool, name: str, level: int):
        super().__init__()
        head_dim = dim // n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, n_heads, head_dim, upcast=upcast, name=f"{name}.self", level=level)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, n_heads, head_dim, context_dim, upcast=upcast, name=f"{name}.cross", level=level)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer block -> feature map, with a residual around it all.

    SD 1.x projects with 1×1 convs before flattening; SD 2.x with Linear layers after flattening.
    """

    def __init__(self, channels: int, n_heads: int, context_dim: int, linear_projection: bool,
                 upcast: bool, groups: int, name: str, level: int):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        make_proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make_proj()
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, n_heads, context_dim, upcast, name, level)])
        self.proj_out = make_proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear_projection:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, H, W] -> [B, HW, C]
        if self.linear_projection:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear_projection:
            tokens = self.proj_out(tokens)
        tokens = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, HW, C] -> [B, C, H, W]
        if not self.linear_projection:
            tokens = self.proj_out(tokens)
        return x + tokens
