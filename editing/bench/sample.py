"""bench sample: text to image, editlab vs diffusers StableDiffusionPipeline (same weights, seed, scheduler)."""

from __future__ import annotations

import torch

from ldm.config import PRESETS
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, text_to_image

from . import machine_description, report, time_alternating
from .peers import diffusers_pipeline, require_peers


def run(preset: str, size: int, steps: int, dtype: torch.dtype, device: torch.device, repeats: int,
        warmup: int, scheduler: str = "ddim") -> str:
    require_peers()
    torch.manual_seed(0)
    model = StableDiffusion(PRESETS[preset]()).eval()
    model.to(device)
    model.unet.to(dtype).use_channels_last()  # as StableDiffusion.load sets it up
    model.text_encoder.to(dtype)
    pipe = diffusers_pipeline(model, scheduler)
    pipe.vae.to(torch.float32)
    prompt = "a red circle on a blue background"
    cfg = SamplingConfig(steps=steps, guidance=7.5, scheduler=scheduler, seed=0, height=size, width=size)

    def editlab(decode: bool):
        latents = text_to_image(model, [prompt], cfg, progress=False)
        return decode_latents(model, latents) if decode else latents

    def diffusers(decode: bool):
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):  # its VAE is fp32 like ours
            return pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(0),
                        output_type="pt" if decode else "latent").images

    with torch.inference_mode():
        difference = (editlab(False).float() - diffusers(False).float()).abs().max().item()
        loop = time_alternating({"editlab": lambda: editlab(False), "diffusers": lambda: diffusers(False)},
                                repeats, warmup, device)
        whole = time_alternating({"editlab": lambda: editlab(True), "diffusers": lambda: diffusers(True)},
                                 repeats, 0, device)
    title = (f"text to image, preset {preset}, {size}x{size}, {steps} {scheduler} steps, CFG batch 2, {dtype}, "
             f"{device} ({machine_description(device)}); max |latents editlab - diffusers| = {difference:.2e}")
    return "\n".join([report(title + "\n sampling loop (text encoding included, no decode):", loop, "step", steps),
                      report(" end to end (with VAE decode):", whole, "image")])
