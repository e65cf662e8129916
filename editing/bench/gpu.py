"""bench gpu: the whole GPU table in one run, printed as a Markdown table for BENCHMARKS.md.

Rows (random weights with the preset's real config; editlab and diffusers hold the same weights):

- UNet forward, batch 2 (one guided step): editlab as loaded (channels_last, fused projections), diffusers as
  it comes (its SDPA attention), diffusers tuned (``fuse_qkv_projections`` and channels_last).
- Text to image, N steps, guided: the same three, plus editlab replaying the UNet from a CUDA graph (GPU).
- Prompt-to-Prompt: an edit of two prompts beside the plain generation of the same two images (time and
  peak memory; the targets are ratios of ≤ 1.3 and ≤ 1.2 on a GPU).
- ControlNet: editlab beside diffusers' ControlNet pipeline, one ControlNet, N steps.
- Edit-friendly DDPM inversion of one image (N steps), beside plain generation of one image (no diffusers
  peer exists for it).

Every group is timed in alternation (editing/bench/__init__.py); peak memory comes from the CUDA allocator.
On the CPU, ``--dry-run`` runs every row at a tiny config in seconds (a CI check that the script works);
its numbers mean nothing.
"""

from __future__ import annotations

import math

import torch

from ldm.config import PRESETS
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, text_to_image
from ldm.speed import CudaGraphUNet, apply_backend_settings, restore_backend_settings

from . import Timing, machine_description, time_alternating
from .peers import diffusers_pipeline, require_peers

SOURCE, TARGET = "a red circle on a blue background", "a red square on a blue background"


def build(preset: str, dtype: torch.dtype, device: torch.device) -> StableDiffusion:
    """A random model set up as ``StableDiffusion.load`` sets it up (channels_last, fused projections,
    UNet and text encoder in ``dtype``, VAE in fp32)."""
    torch.manual_seed(0)
    model = StableDiffusion(PRESETS[preset]()).eval().to(device)
    model.unet.to(dtype).use_channels_last().fuse_projections()
    model.text_encoder.to(dtype)
    return model


def diffusers_pipes(model: StableDiffusion, dtype: torch.dtype) -> dict[str, object]:
    """{"diffusers": as it comes, "diffusers tuned": fused QKV and channels_last}, VAEs in fp32 like ours."""
    plain, tuned = diffusers_pipeline(model), diffusers_pipeline(model)
    tuned.unet.fuse_qkv_projections()
    tuned.unet.to(memory_format=torch.channels_last)
    for pipe in (plain, tuned):
        pipe.vae.to(torch.float32)
    return {"diffusers": plain, "diffusers tuned": tuned}


def _row(group: str, timings: dict[str, Timing], baseline: str, per: int = 1) -> list[str]:
    base = timings[baseline].median
    lines = []
    for name, t in timings.items():
        peak = f"{t.peak_bytes / 2**20:.0f}" if t.peak_bytes else "–"
        ratio = t.median / base
        peak_ratio = (f"{t.peak_bytes / timings[baseline].peak_bytes:.3f}"
                      if t.peak_bytes and timings[baseline].peak_bytes else "–")
        lines.append(f"| {group} | {name} | {t.median / per:.4f} | {peak} | {ratio:.3f} | {peak_ratio} |")
    return lines


def run(preset: str, size: int, steps: int, dtype: torch.dtype, device: torch.device, repeats: int, warmup: int,
        cuda_graph: bool = True) -> str:
    require_peers()
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting with to() would fill the table's output

    from controls import Control, ControlNet, controlnet_to_image
    from controls.controlnet import SD_HINT_CHANNELS
    from editing.ddpm_edit.editor import DDPMEditConfig, edit_inversion
    from editing.p2p.edit import P2PConfig, prompt_to_prompt
    from inversion.ddpm_noise import DDPMInversionConfig, invert
    from weights_convert.controlnet import to_diffusers_config

    previous = apply_backend_settings(device)
    try:
        model = build(preset, dtype, device)
        pipes = diffusers_pipes(model, dtype)
        cfg = SamplingConfig(steps=steps, guidance=7.5, seed=0, height=size, width=size)
        f = model.config.vae.downsample_factor
        latent = size // f
        lines = [f"GPU table: preset {preset}, {size}x{size}, {steps} DDIM steps, CFG 7.5, {dtype}, {device} "
                 f"({machine_description(device)})", "",
                 "| what | contender | seconds | peak MiB | time ratio | memory ratio |", "|---|---|---|---|---|---|"]
        timed = lambda runs, baseline, group: lines.extend(  # noqa: E731
            _row(group, time_alternating(runs, repeats, warmup, device), baseline))

        with torch.inference_mode():
            # UNet forward: batch 2 = one guided step
            x = torch.randn(2, model.config.unet.in_channels, latent, latent, device=device, dtype=dtype)
            context = torch.randn(2, 77, model.config.unet.context_dim, device=device, dtype=dtype)
            t = torch.full((2,), 500, device=device)
            unets = {"editlab": lambda: model.unet(x, t, context)}
            unets.update({name: (lambda u: lambda: u(x, t, context))(pipe.unet) for name, pipe in pipes.items()})
            timed(unets, "diffusers", "UNet forward, batch 2")

            # text to image
            def diffusers_image(pipe):
                return lambda: pipe(SOURCE, num_inference_steps=steps, guidance_scale=7.5, height=size,
                                    width=size, generator=torch.Generator("cpu").manual_seed(0),
                                    output_type="latent").images

            images = {"editlab": lambda: text_to_image(model, [SOURCE], cfg, progress=False)}
            if cuda_graph and device.type == "cuda":
                eager, graphed = model.unet, CudaGraphUNet(model.unet)

                def replayed():  # the same model with its UNet call replayed from a CUDA graph
                    model.unet = graphed
                    try:
                        return text_to_image(model, [SOURCE], cfg, progress=False)
                    finally:
                        model.unet = eager

                images["editlab cuda graph"] = replayed
            images.update({name: diffusers_image(pipe) for name, pipe in pipes.items()})
            timed(images, "diffusers", f"text to image, {steps} steps")

            # Prompt-to-Prompt vs plain generation of the same two images
            config = P2PConfig(blend_words=("circle", "square"))
            timed({"P2P edit": lambda: prompt_to_prompt(model, SOURCE, TARGET, cfg, config),
                   "plain, 2 images": lambda: text_to_image(model, [SOURCE, TARGET], cfg, progress=False)},
                  "plain, 2 images", "Prompt-to-Prompt, 2 prompts")

            # ControlNet
            hint_channels = SD_HINT_CHANNELS[:int(math.log2(f)) + 1]
            net = ControlNet.from_unet(model.unet, hint_channels).to(device, dtype).eval()
            hint = torch.rand(1, 3, size, size, device=device)
            peer = ControlNetModel(**to_diffusers_config(net.control_config))
            peer.load_state_dict(net.state_dict(), strict=True)
            peer.to(device, dtype).eval()
            plain = pipes["diffusers"]
            control_pipe = StableDiffusionControlNetPipeline(
                vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer, unet=plain.unet,
                controlnet=peer, scheduler=plain.scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
            control_pipe.set_progress_bar_config(disable=True)
            timed({"editlab": lambda: controlnet_to_image(model, [Control(net, hint)], [SOURCE], cfg, progress=False),
                   "diffusers": lambda: control_pipe(SOURCE, image=hint, num_inference_steps=steps, guidance_scale=7.5,
                                                     height=size, width=size, output_type="latent",
                                                     generator=torch.Generator("cpu").manual_seed(0)).images},
                  "diffusers", f"ControlNet, {steps} steps")

            # edit-friendly DDPM inversion + one edit, beside plain generation
            x0 = torch.randn(1, model.config.vae.latent_channels, latent, latent, device=device, dtype=dtype)
            inversion_cfg = DDPMInversionConfig(steps=steps)
            skip = int(0.36 * steps)

            def ddpm():
                inversion = invert(model, x0, SOURCE, inversion_cfg, torch.Generator("cpu").manual_seed(0))
                return edit_inversion(model, inversion, TARGET, DDPMEditConfig(skip=skip))

            timed({"DDPM inversion + edit": ddpm,
                   "plain, 1 image": lambda: text_to_image(model, [SOURCE], cfg, progress=False)},
                  "plain, 1 image", f"edit-friendly DDPM, {steps} steps (edit from {skip})")
    finally:
        restore_backend_settings(previous)
    lines += ["", f"seconds: median of {repeats} alternating rounds per call (a whole run: every step). Ratios: "
              "against diffusers as it comes (UNet, text to image, ControlNet), against editlab's plain generation "
              "(Prompt-to-Prompt, DDPM)."]
    return "\n".join(lines)
