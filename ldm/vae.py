"""The KL autoencoder of latent diffusion (*High-Resolution Image Synthesis with Latent Diffusion Models*).

    encode: x ∈ [−1, 1]^(3×H×W)  ->  q(z|x) = N(μ, σ²), μ, log σ² ∈ R^(4×H/f×W/f), f = 2^(levels−1)
    decode: z  ->  x̂

Latent scaling (z_model = 0.18215·z) is done by ``scale_latents`` / ``unscale_latents`` and never in place.
Conventions (docs/checkpoints.md §6, §13): GroupNorm eps 1e-6 everywhere, downsampling pads right and bottom
only, one-head attention in the middle blocks, log σ² clamped to [−30, 20]. The decoder stores its levels
deepest first (diffusers up_blocks order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import VAEConfig
from .layers import Downsample, GroupNorm32, ResBlock, Upsample


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); the mode is the mean."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)  # [B, 2C, h, w] -> 2 × [B, C, h, w]
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε drawn on ``generator``'s device as diffusers does (randn_tensor)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # not gaussian_noise: the generator is optional


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, None, groups, eps=1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, h):
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class VAEAttention(Attention):
    """Single-head self-attention over the H·W positions, with a GroupNorm before and a residual around."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, n_heads=1, head_dim=ch, bias=True)
        self.group_norm = GroupNorm32(groups, ch, eps=1e-6)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        return x + super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            level = nn.Module()
            prev = chs[max(i - 1, 0)]
            level.resnets = nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, None, g, eps=1e-6)
                                           for j in range(cfg.layers_per_level)])
            last = i == len(chs) - 1
            level.downsamplers = nn.ModuleList([] if last else [Downsample(ch, asymmetric_pad=True)])
            self.down_blocks.append(level)
        self.mid_block = VAEMidBlock(chs[-1], g)
        self.conv_norm_out = GroupNorm32(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for down in level.downsamplers:
                h = down(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_channels[::-1], cfg.norm_groups  # deepest level first
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = VAEMidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            level = nn.Module()
            prev = chs[max(i - 1, 0)]
            level.resnets = nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, None, g, eps=1e-6)
                                           for j in range(cfg.layers_per_level + 1)])
            last = i == len(chs) - 1
            level.upsamplers = nn.ModuleList([] if last else [Upsample(ch)])
            self.up_blocks.append(level)
        self.conv_norm_out = GroupNorm32(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for up in level.upsamplers:
                h = up(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """:param x: images [B, 3, H, W] in [−1, 1], H and W multiples of the downsample factor."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: unscaled latents [B, 4, h, w]; returns images in about [−1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.config.scaling_factor  # never in place: the caller keeps its tensor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor
