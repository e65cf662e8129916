"""ControlNet: a trainable copy of the UNet encoder, fed a spatial hint, steering the locked UNet.

Paper: *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao, Agrawala, ICCV 2023);
layer list from the released code (lllyasviel/ControlNet cldm/cldm.py) and weights, not the paper's figure
(docs/methods.md §7.1). With F the locked block, F' its trainable copy and Z a 1×1 conv initialised to zero,
the paper's eq. 2 is

    y = F(x) + Z(F'(x + Z(c)))

For Stable Diffusion this happens in two places:
- here: ``h = conv_in(x) + E(c)`` (E: the hint encoder, ending in a zero conv) runs through the copied
  down levels and middle block; each of the 13 feature maps (12 skips + mid) leaves through its own zero
  conv Z_k, scaled by s_k (``forward``);
- in the locked UNet (``ldm.unet.UNet.forward``): skip_k ← skip_k + s_k·r_k and h_mid ← h_mid + s_12·r_12.

Hint encoder E (cldm.py ``input_hint_block``, 8 convs 3×3 with SiLU between them):
3→16, 16→16, 16→32 (stride 2), 32→32, 32→96 (stride 2), 96→96, 96→256 (stride 2), then a zero conv 256→320:
a 512² hint becomes 64²×320, the size of conv_in's output. The number of stride-2 convs is
len(hint_channels) − 1, so a model with a VAE factor f needs log2(f) + 1 hint channel entries.

Module names are diffusers' ``ControlNetModel`` names (conv_in, time_embedding, down_blocks, mid_block,
controlnet_cond_embedding, controlnet_down_blocks, controlnet_mid_block), so its weights load as they are.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import UNetConfig
from ldm.model import load_strict, read_weights, save_weights
from ldm.unet import UNet, UNetEncoder, skip_channels

FORMAT = "editlab-controlnet"
SD_HINT_CHANNELS = (16, 32, 96, 256)  # the released hint encoder; 3 stride-2 convs = SD's VAE factor 8


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the UNet this ControlNet copies (its encoder half) and controls
    hint_channels: tuple[int, ...] = SD_HINT_CHANNELS  # hint encoder widths; one stride-2 conv between each pair
    conditioning_channels: int = 3  # RGB hints

    @property
    def hint_factor(self) -> int:
        """Hint pixels per latent pixel: 2^(number of stride-2 convs)."""
        return 2 ** (len(self.hint_channels) - 1)

    @property
    def n_residuals(self) -> int:
        """One residual per UNet skip plus one for the middle block (13 for SD)."""
        return len(skip_channels(self.unet)) + 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ControlNetConfig":
        raw = json.loads(text)
        unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["unet"].items()})
        return cls(unet=unet, hint_channels=tuple(raw["hint_channels"]),
                   conditioning_channels=raw["conditioning_channels"])


def zero_conv(in_ch: int, out_ch: int, kernel_size: int = 1) -> nn.Conv2d:
    """Z(·): a convolution whose weight and bias start at zero, so its output is zero until trained."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """E(c): hint image [B, 3, f·h, f·w] in [0, 1] -> features [B, C_0, h, w] (cldm.py input_hint_block)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        chs = cfg.hint_channels
        self.conv_in = nn.Conv2d(cfg.conditioning_channels, chs[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(chs[:-1], chs[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))  # halves the side
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_conv(chs[-1], cfg.unet.model_channels, kernel_size=3)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # [B, C_hint, H, W] -> [B, model_channels, H/f, W/f]


class ControlNet(UNetEncoder):
    """F' (conv_in, time embedding, down levels, middle block: the UNet encoder's layers), E and the zero
    convs. ``forward`` returns the residuals the locked UNet adds to its skips and middle block."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet)
        self.control_config = cfg
        self.controlnet_cond_embedding = HintEncoder(cfg)
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(ch, ch) for ch in skip_channels(cfg.unet)])
        mid = cfg.unet.level_channels[-1]
        self.controlnet_mid_block = zero_conv(mid, mid)

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: tuple[int, ...] = SD_HINT_CHANNELS,
                  generator: torch.Generator | None = None) -> "ControlNet":
        """The training start (tool_add_control.py): copy the UNet's encoder weights into F'; the hint
        encoder's inner convs get fresh random weights drawn from ``generator`` (default: seeded with 0), and
        every zero conv (E's last conv, the 13 Z_k) starts at zero."""
        cfg = ControlNetConfig(unet=unet.config, hint_channels=tuple(hint_channels))
        net = cls(cfg).to(unet.conv_in.weight.device, unet.conv_in.weight.dtype)
        decoder = ("up_blocks.", "conv_norm_out.", "conv_out.")
        net.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith(decoder)}, strict=False)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        for conv in [net.controlnet_cond_embedding.conv_in, *net.controlnet_cond_embedding.blocks]:
            _reinit_conv(conv, generator)
        return net

    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor, hint: torch.Tensor,
                scales: float | Sequence[float] = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the locked UNet.

        :param x: the same (scale_model_input'ed) latents the UNet gets [B, C, h, w]
        :param hint: [B, 3, f·h, f·w] in [0, 1] (f = config.hint_factor)
        :param scales: one strength for all residuals, or one per residual (n_residuals; guess mode)
        :return: (down residuals, one per skip, each s_k·Z_k(skip'_k); mid residual s·Z(h'_mid))
        """
        scales = self._scales(scales)
        expected = tuple(s * self.control_config.hint_factor for s in x.shape[-2:])
        if tuple(hint.shape[-2:]) != expected or hint.shape[0] != x.shape[0]:
            raise ValueError(f"hint of shape {tuple(hint.shape)} does not fit latents {tuple(x.shape)}: need "
                             f"[{x.shape[0]}, 3, {expected[0]}, {expected[1]}] (the hint is "
                             f"{self.control_config.hint_factor}x the latent size, one per latent)")
        emb = self.embed_time(timestep, x.shape[0], x.device)
        h, skips = self.encode(x, emb, context, hint=self.controlnet_cond_embedding(hint))  # F'(x + Z(c))
        h = self.mid_block(h, emb, context)
        down = [s * zero(skip) for s, zero, skip in zip(scales, self.controlnet_down_blocks, skips)]  # s_k·Z_k(·)
        return down, scales[-1] * self.controlnet_mid_block(h)

    def _scales(self, scales: float | Sequence[float]) -> list[float]:
        n = self.control_config.n_residuals
        if isinstance(scales, (int, float)):
            return [float(scales)] * n
        scales = [float(s) for s in scales]
        if len(scales) != n:
            raise ValueError(f"{len(scales)} control scales for {n} residuals; give one number or one per residual")
        return scales

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
        save_weights(path, self, FORMAT, self.control_config.to_json(), extra_metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "ControlNet":
        """Load a file written by ``save`` (``editlab convert`` writes them from released ControlNets)."""
        metadata, tensors = read_weights(path, FORMAT, "editlab ControlNet")
        net = cls(ControlNetConfig.from_json(metadata["config"]))
        load_strict(net, tensors, path)
        return net.to(device, dtype).eval()


@torch.no_grad()
def _reinit_conv(conv: nn.Conv2d, generator: torch.Generator) -> None:
    """PyTorch's default Conv2d init (uniform ±1/√fan_in), drawn from ``generator``."""
    bound = 1 / conv.weight[0].numel() ** 0.5
    conv.weight.copy_(torch.rand(conv.weight.shape, generator=generator) * 2 * bound - bound)
    conv.bias.copy_(torch.rand(conv.bias.shape, generator=generator) * 2 * bound - bound)
