"""The Stable Diffusion UNet (*High-Resolution Image Synthesis with Latent Diffusion Models*, Rombach et al.).

Topology for SD 1.5 (levels i = 0..3, C_i = 320, 640, 1280, 1280, L = 2 ResBlocks per encoder level)::

    conv_in 4->320                                           skips: [320]
    down 0: (Res+Attn)×2 320, Down    64² -> 32²             skips: +320, +320, +320
    down 1: (Res+Attn)×2 640, Down    32² -> 16²             skips: +640, +640, +640
    down 2: (Res+Attn)×2 1280, Down   16² -> 8²              skips: +1280, +1280, +1280
    down 3: Res×2 1280 (no attention, no downsampler)        skips: +1280, +1280
    mid:    Res, Attn, Res 1280
    up 0 (level 3): Res×3 (1280 + skip 1280, 1280, 1280), Up          8² -> 16²
    up 1 (level 2): (Res+Attn)×3 (1280+1280, 1280+1280, 1280+640), Up 16² -> 32²
    up 2 (level 1): (Res+Attn)×3 (1280+640, 640+640, 640+320), Up     32² -> 64²
    up 3 (level 0): (Res+Attn)×3 (640+320, 320+320, 320+320)
    GroupNorm, SiLU, conv_out 320->4

Each up ResBlock takes the previous output concatenated with the last unused skip. ControlNet's 13 residuals
are added to the skips (12) and to the middle block output (1) before the decoder runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import UNetConfig
from .layers import Downsample, GroupNorm32, ResBlock, SpatialTransformer, TimestepEmbedding, Upsample


class DownLevel(nn.Module):
    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, embed_dim: int):
        super().__init__()
        out_ch = cfg.level_channels[level]
        self.resnets = nn.ModuleList(
            [ResBlock(in_ch if j == 0 else out_ch, out_ch, embed_dim, cfg.norm_groups) for j in range(cfg.layers_per_level)])
        self.attentions = nn.ModuleList(
            [_transformer(cfg, out_ch, f"down.{level}.{j}", level) for j in range(cfg.layers_per_level)]
            if cfg.attention_levels[level] else [])
        last = level == len(cfg.channel_mult) - 1
        self.downsamplers = nn.ModuleList([] if last else [Downsample(out_ch, asymmetric_pad=False)])

    def forward(self, h, emb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[j](h, context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, embed_dim: int):
        super().__init__()
        ch, level = cfg.level_channels[-1], len(cfg.channel_mult) - 1
        self.resnets = nn.ModuleList([ResBlock(ch, ch, embed_dim, cfg.norm_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, ch, "mid.0.0", level)])

    def forward(self, h, emb, context):
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)


class UpLevel(nn.Module):
    def __init__(self, cfg: UNetConfig, index: int, prev_ch: int, skip_channels: list[int], embed_dim: int):
        super().__init__()
        level = len(cfg.channel_mult) - 1 - index  # up block 0 is the deepest level
        out_ch = cfg.level_channels[level]
        in_chs = [(prev_ch if j == 0 else out_ch) + skip_channels.pop() for j in range(cfg.layers_per_level + 1)]
        self.resnets = nn.ModuleList([ResBlock(c, out_ch, embed_dim, cfg.norm_groups) for c in in_chs])
        self.attentions = nn.ModuleList(
            [_transformer(cfg, out_ch, f"up.{index}.{j}", level) for j in range(cfg.layers_per_level + 1)]
            if cfg.attention_levels[level] else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if level > 0 else [])

    def forward(self, h, emb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)  # [B, C, H, W] ++ [B, C_skip, H, W]
            if self.attentions:
                h = self.attentions[j](h, context)
        for up in self.upsamplers:
            h = up(h, size=skips[-1].shape[-2:] if skips else None)
        return h


def _transformer(cfg: UNetConfig, channels: int, name: str, level: int) -> SpatialTransformer:
    return SpatialTransformer(channels, cfg.heads_at(channels), cfg.context_dim, cfg.linear_projection,
                              cfg.upcast_attention, cfg.norm_groups, name, level)


def skip_channels(cfg: UNetConfig) -> list[int]:
    """Channels of every skip the encoder pushes, in push order (conv_in first)."""
    chs = [cfg.level_channels[0]]
    for level, ch in enumerate(cfg.level_channels):
        chs += [ch] * cfg.layers_per_level
        if level < len(cfg.level_channels) - 1:
            chs.append(ch)
    return chs


class UNetEncoder(nn.Module):
    """conv_in, the time embedding, the down levels and the middle block: the half of the UNet that
    ControlNet copies."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        embed_dim = cfg.model_channels * cfg.time_embed_dim_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)
        self.time_embedding = TimestepEmbedding(cfg.model_channels, embed_dim)
        ins = [cfg.model_channels] + list(cfg.level_channels[:-1])
        self.down_blocks = nn.ModuleList([DownLevel(cfg, i, ins[i], embed_dim) for i in range(len(cfg.channel_mult))])
        self.mid_block = MidBlock(cfg, embed_dim)

    def embed_time(self, timestep: torch.Tensor | float, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        return self.time_embedding(t.reshape(-1).expand(batch) if t.numel() == 1 else t)

    def encode(self, x, emb, context, hint: torch.Tensor | None = None):
        """Down levels; returns (h, skips). ``hint`` (ControlNet) is added right after conv_in."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        for level in self.down_blocks:
            h = level(h, emb, context, skips)
        return h, skips


class UNet(UNetEncoder):
    """ε_θ(x_t, t, c) (or v_θ for v-prediction models).

    :param x: noisy latents [B, in_channels, H, W]
    :param timestep: scalar or [B], integer or fractional
    :param context: text hidden states [B, 77, context_dim]
    :param down_residuals: optional residuals added to the skips, one per skip (12 for SD; ControlNet)
    :param mid_residual: optional residual added to the middle block output (ControlNet)
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        skips = skip_channels(cfg)
        prevs = [cfg.level_channels[-1]] + [cfg.level_channels[-1 - i] for i in range(len(cfg.channel_mult) - 1)]
        self.up_blocks = nn.ModuleList(
            [UpLevel(cfg, i, prevs[i], skips, cfg.model_channels * cfg.time_embed_dim_mult) for i in range(len(prevs))])
        assert not skips, "every skip is consumed"
        self.conv_norm_out = GroupNorm32(cfg.norm_groups, cfg.model_channels, eps=1e-5)
        self.conv_out = nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1)
        self.channels_last = False

    def use_channels_last(self) -> "UNet":
        """Keep conv weights and activations in NHWC ("channels_last") layout: oneDNN (CPU) and cuDNN
        convolutions run faster on it (≈5% for the SD 1.5 UNet on a 2-core CPU; BENCHMARKS.md). Numerics
        change only at rounding level. ``StableDiffusion.load`` turns it on."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def fuse_projections(self, enabled: bool = True) -> "UNet":
        """Every attention layer computes Q, K, V (self) or K, V (cross) with one stacked matrix product
        (``Attention.fuse_projections``); the weights and their names are unchanged. ``StableDiffusion.load``
        turns it on."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(enabled)
        return self

    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor,
                down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None):
        emb = self.embed_time(timestep, x.shape[0], x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h, skips = self.encode(x, emb, context)
        if down_residuals is not None:
            assert len(down_residuals) == len(skips), f"{len(down_residuals)} residuals for {len(skips)} skips"
            skips = [s + r for s, r in zip(skips, down_residuals)]
        h = self.mid_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual
        for level in self.up_blocks:
            h = level(h, emb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
