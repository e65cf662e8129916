"""bench unet: one UNet forward, editlab vs diffusers UNet2DConditionModel (same weights and inputs).

Both models are built on the meta device and then hold the *same* parameter tensors (diffusers' takes
editlab's with ``assign``), so even the 2.6 B-parameter SDXL UNet is held once (10.3 GB in fp32).
"""

from __future__ import annotations

import math

import torch

from ldm.config import PRESETS, UNetConfig
from ldm.unet import TextTime, UNet

from . import machine_description, report, time_alternating
from .peers import diffusers_unet_config, require_peers


def shared_unets(cfg: UNetConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(editlab UNet, diffusers UNet2DConditionModel) sharing one set of random weights (norm scales ~1,
    biases ~0, other weights N(0, 1/fan_in))."""
    require_peers()
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet(cfg)
        peer = UNet2DConditionModel(**diffusers_unet_config(cfg))
    ours = fill_random(ours.to_empty(device=device).to(dtype), seed)
    peer.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours.eval(), peer.eval()


def fill_random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights in place: norm scales ~1, biases ~0, other weights N(0, 1/fan_in)."""
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim <= 1:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 1 / math.sqrt(param[0].numel()), generator=generator)
    return module


def unet_inputs(cfg: UNetConfig, batch: int, latent_size: int, dtype: torch.dtype, device: torch.device):
    """(x, t, context, added) for one forward; ``added`` (SDXL's pooled text and six numbers) or None."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, latent_size, latent_size, generator=generator).to(device, dtype)
    context = torch.randn(batch, 77, cfg.context_dim, generator=generator).to(device, dtype)
    added = None
    if cfg.addition_embed == "text_time":
        pooled = cfg.addition_in_dim - 6 * cfg.addition_time_embed_dim
        side = 8.0 * latent_size
        added = TextTime(torch.randn(batch, pooled, generator=generator).to(device, dtype),
                         torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device, dtype=dtype))
    return x, torch.full((batch,), 500, device=device), context, added


def peer_call(peer, x, t, context, added):
    kwargs = {} if added is None else {"added_cond_kwargs": {"text_embeds": added.text_embeds, "time_ids": added.time_ids}}
    return peer(x, t, context, **kwargs).sample


def run(preset: str, batch: int, latent_size: int, dtype: torch.dtype, device: torch.device, repeats: int,
        warmup: int, channels_last: bool = True) -> str:
    cfg = PRESETS[preset]().unet
    ours, peer = shared_unets(cfg, dtype, device)
    if channels_last:  # editlab's default layout (StableDiffusion.load); diffusers runs in its default NCHW
        ours.use_channels_last()
    x, t, context, added = unet_inputs(cfg, batch, latent_size, dtype, device)

    with torch.inference_mode():
        reference = peer_call(peer, x, t, context, added).float()
        difference = (ours(x, t, context, added=added).float() - reference).abs().max().item()
        relative = difference / reference.abs().max().item()
        timings = time_alternating({"editlab": lambda: ours(x, t, context, added=added),
                                    "diffusers": lambda: peer_call(peer, x, t, context, added)}, repeats, warmup, device)
    layout = "channels_last" if channels_last else "NCHW"
    title = (f"UNet forward, preset {preset}, editlab {layout}, batch {batch}, latents {latent_size}x{latent_size}, "
             f"{dtype}, {device} ({machine_description(device)}); max |editlab - diffusers| = {difference:.2e} "
             f"({relative:.1e} of max |diffusers|)")
    return report(title, timings)
