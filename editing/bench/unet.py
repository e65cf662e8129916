"""bench unet: one UNet forward, editlab vs diffusers UNet2DConditionModel (same weights and inputs)."""

from __future__ import annotations

import torch

from ldm.config import PRESETS
from ldm.unet import UNet

from . import machine_description, report, time_alternating
from .peers import diffusers_unet_config, require_peers


def run(preset: str, batch: int, latent_size: int, dtype: torch.dtype, device: torch.device, repeats: int,
        warmup: int, channels_last: bool = True) -> str:
    require_peers()
    from diffusers import UNet2DConditionModel

    cfg = PRESETS[preset]().unet
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    peer = UNet2DConditionModel(**diffusers_unet_config(cfg)).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)
    ours.to(device, dtype)
    if channels_last:  # editlab's default layout (StableDiffusion.load); diffusers runs in its default NCHW
        ours.use_channels_last()
    peer.to(device, dtype)
    x = torch.randn(batch, cfg.in_channels, latent_size, latent_size, device=device, dtype=dtype)
    context = torch.randn(batch, 77, cfg.context_dim, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)

    with torch.inference_mode():
        difference = (ours(x, t, context).float() - peer(x, t, context).sample.float()).abs().max().item()
        timings = time_alternating({"editlab": lambda: ours(x, t, context),
                                    "diffusers": lambda: peer(x, t, context)}, repeats, warmup, device)
    layout = "channels_last" if channels_last else "NCHW"
    title = (f"UNet forward, preset {preset}, editlab {layout}, batch {batch}, latents {latent_size}x{latent_size}, "
             f"{dtype}, {device} ({machine_description(device)}); max |editlab - diffusers| = {difference:.2e}")
    return report(title, timings)
