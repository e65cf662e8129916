"""Sampling: text to image with classifier-free guidance, and SDEdit (image to image).

Classifier-free guidance (*Classifier-Free Diffusion Guidance*, Ho & Salimans):

    ε̂ = ε_u + w·(ε_c − ε_u)        one UNet call on the rows [uncond × B; cond × B], as diffusers
                                   (ldm.hooks.guidance_rows names this layout for every hook)

SDEdit (*SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations*, Meng et al.):
encode the image, z0 = s·E(x).sample() (s = 0.18215, SDXL 0.13025); noise it to the first kept step,
x_{t0} = √ᾱ_{t0} z0 + √(1−ᾱ_{t0}) ε; then sample as usual from there (docs/methods.md §5).

Random draws follow diffusers exactly, on one CPU ``torch.Generator``: the initial latents
``randn((B, 4, H/8, W/8))`` (SDEdit: the posterior sample, then the noise), then each step's noise in the
sampler. So the same seed, scheduler and weights give the same image in both.

SDXL takes the same path: ``prompt_conditioning`` adds its pooled text embedding and size/crop numbers
(ldm/sdxl.py), which travel beside the context to every UNet call.

Every editing method reuses ``denoise``: it takes a ``predict(x, i, t)`` function (here CFG over the
UNet; InstructPix2Pix and ControlNet bring their own) and optional step hooks (``ldm.hooks.StepHook``:
``begin_step(i, t)`` and ``end_step(i, t, latents) -> latents``; Prompt-to-Prompt counts steps and blends
latents there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .hooks import StepHook, guidance_batch, join_guidance, split_guidance
from .model import StableDiffusion
from .schedulers import NoiseSchedule, gaussian_noise, make_sampler
from .sdxl import MicroConditioning
from .sdxl import conditioning as sdxl_conditioning
from .unet import TextTime

Predictor = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    guidance: float = 7.5  # w; CFG runs only when w > 1 (as diffusers)
    scheduler: str = "ddim"  # "ddim", "ddpm" or "euler-a"
    eta: float = 0.0  # DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like)
    seed: int = 0
    height: int = 512
    width: int = 512


def check_image_size(height: int, width: int, factor: int) -> None:
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} is not a multiple of {factor} (the VAE's downsampling "
                         f"factor); choose sizes such as {max(factor, width // factor * factor)}x"
                         f"{max(factor, height // factor * factor)}")


def guided(guidance: float | Sequence[float]) -> bool:
    """Classifier-free guidance runs when any scale is above 1 (as diffusers); w ≤ 1 everywhere runs the
    conditional rows alone."""
    return max(torch.as_tensor(guidance, dtype=torch.float32).flatten().tolist()) > 1.0


def text_context(model: StableDiffusion, prompts: Sequence[str], negative: str | Sequence[str] | None,
                 guidance: float | Sequence[float]) -> torch.Tensor:
    """Cross-attention context: [negative; prompts] ([2B, 77, C]) under guidance, else prompts ([B, 77, C])."""
    cond = model.encode_prompt(list(prompts))
    if not guided(guidance):
        return cond
    negative = [""] * len(prompts) if negative is None else negative
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
    return join_guidance(model.encode_prompt(negative), cond)


def prompt_conditioning(model: StableDiffusion, prompts: Sequence[str], negative: str | Sequence[str] | None,
                        guidance: float | Sequence[float], height: int, width: int,
                        micro: MicroConditioning | None = None) -> tuple[torch.Tensor, TextTime | None]:
    """(context, added conditioning) for the UNet batch: ``text_context`` for SD 1.x/2.x (no added
    conditioning), ldm/sdxl.py's two encoders, pooled embedding and micro-conditioning for SDXL."""
    if model.is_sdxl:
        return sdxl_conditioning(model, prompts, negative, guided(guidance), height, width, micro)
    if micro is not None:
        raise ValueError("size/crop micro-conditioning (--original-size, --crop-top-left, --target-size) is an "
                         "SDXL input; this is an SD 1.x/2.x model")
    return text_context(model, prompts, negative, guidance), None


def guided_unet(unet, context: torch.Tensor, guidance: float | Sequence[float], sampler=None,
                added: TextTime | None = None) -> Predictor:
    """predict(x, i, t) = ε_u + w_b(ε_c − ε_u) per row b, from one UNet call on [uncond; cond] (or the plain
    conditional output when every w ≤ 1). ``guidance`` is one scale or one per row (Prompt-to-Prompt batches
    run the source at w_src and the edit at w_tar). ``sampler`` scales the input (Euler's c_in); None for
    samplers whose input needs no scaling (DDIM, DDPM). ``added``: SDXL's pooled embedding and
    micro-conditioning, rows matching ``context``."""
    scales = torch.as_tensor(guidance, dtype=torch.float32).flatten()
    extra = {} if added is None else {"added": added}  # SD 1.x/2.x UNets (and wrappers of them) take three inputs

    def predict(x: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        x_in = x if sampler is None else sampler.scale_model_input(x, i)
        if not guided(guidance):
            return unet(x_in, t, context, **extra)
        if len(scales) not in (1, x.shape[0]):
            raise ValueError(f"{len(scales)} guidance scales for a batch of {x.shape[0]}; give one or one per row")
        w = scales.to(x.device, x.dtype).view(-1, 1, 1, 1) if len(scales) > 1 else float(scales)
        uncond, cond = split_guidance(unet(guidance_batch(x_in), t, context, **extra))  # [uncond × B; cond × B]
        return uncond + w * (cond - uncond)

    return predict


def denoise(sampler, predict: Predictor, latents: torch.Tensor, generator: torch.Generator | None,
            start: int = 0, hooks: Sequence = (), progress: bool = True) -> torch.Tensor:
    """Run the sampler from step ``start`` to the end; returns the final latents."""
    for hook in hooks:
        if not isinstance(hook, StepHook):
            raise TypeError(f"{type(hook).__name__} is not a step hook; subclass ldm.hooks.StepHook")
    steps = range(start, len(sampler.timesteps))
    for i in tqdm(steps, disable=not progress, leave=False, desc="sampling"):
        t = sampler.timesteps[i]
        for hook in hooks:
            hook.begin_step(i, t)
        latents = sampler.step(predict(latents, i, t), i, latents, generator)
        for hook in hooks:
            latents = hook.end_step(i, t, latents)
    return latents


def initial_noise(model: StableDiffusion, batch: int, height: int, width: int, generator: torch.Generator,
                  dtype: torch.dtype) -> torch.Tensor:
    """Gaussian latents [B, 4, H/f, W/f], drawn on the generator's device as diffusers' randn_tensor."""
    f = model.config.vae.downsample_factor
    shape = (batch, model.config.vae.latent_channels, height // f, width // f)
    return gaussian_noise(shape, generator, model.device, dtype)


@torch.no_grad()
def decode_latents(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images [B, 3, H, W] in [0, 1] (fp32; the VAE is kept in fp32, so fp16 runs cannot
    overflow into black images)."""
    vae = model.vae
    images = vae.decode(vae.unscale_latents(latents.to(vae.dtype)))
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(model: StableDiffusion, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> model latents 0.18215·z, z a posterior sample (or the mode when
    no generator is given)."""
    vae = model.vae
    posterior = vae.encode((images * 2 - 1).to(model.device, vae.dtype))
    z = posterior.mode() if generator is None else posterior.sample(generator)
    return vae.scale_latents(z)


def sampler_for(model: StableDiffusion, cfg: SamplingConfig):
    """The sampler ``cfg`` names, on SD's noise schedule, reading the model's prediction type."""
    return make_sampler(cfg.scheduler, NoiseSchedule.scaled_linear(), cfg.steps, eta=cfg.eta,
                        prediction_type=model.config.prediction_type)


@torch.no_grad()
def text_to_image(model: StableDiffusion, prompts: Sequence[str], cfg: SamplingConfig = SamplingConfig(),
                  negative: str | Sequence[str] | None = None, hooks: Sequence = (), progress: bool = True,
                  micro: MicroConditioning | None = None) -> torch.Tensor:
    """Returns the final latents [B, 4, H/8, W/8]; ``decode_latents`` turns them into images. ``micro``:
    SDXL's size/crop conditioning (default: the output size, crop (0, 0))."""
    check_image_size(cfg.height, cfg.width, model.config.vae.downsample_factor)
    sampler = sampler_for(model, cfg)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    context, added = prompt_conditioning(model, prompts, negative, cfg.guidance, cfg.height, cfg.width, micro)
    latents = initial_noise(model, len(prompts), cfg.height, cfg.width, generator, context.dtype)
    latents = latents * sampler.init_noise_sigma
    predict = guided_unet(model.unet, context, cfg.guidance, sampler, added)
    return denoise(sampler, predict, latents, generator, hooks=hooks, progress=progress)


@torch.no_grad()
def sdedit(model: StableDiffusion, images: torch.Tensor, prompts: Sequence[str], strength: float = 0.8,
           cfg: SamplingConfig = SamplingConfig(), negative: str | Sequence[str] | None = None,
           hooks: Sequence = (), progress: bool = True, micro: MicroConditioning | None = None) -> torch.Tensor:
    """SDEdit from ``images`` [B, 3, H, W] in [0, 1]; returns the final latents. ``micro``: SDXL's size/crop
    conditioning (default: the image size, crop (0, 0))."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} is outside (0, 1]; 0.3 keeps most of the image, 1.0 almost none")
    check_image_size(images.shape[-2], images.shape[-1], model.config.vae.downsample_factor)
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts; give one prompt per image")
    sampler = sampler_for(model, cfg)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    context, added = prompt_conditioning(model, prompts, negative, cfg.guidance, images.shape[-2], images.shape[-1],
                                         micro)
    start = sampler.start_index(strength)
    if start >= len(sampler.timesteps):
        raise ValueError(f"strength {strength} with {cfg.steps} steps leaves no step to run; raise either")
    z0 = encode_images(model, images, generator).to(context.dtype)
    noise = gaussian_noise(z0.shape, generator, z0.device, z0.dtype)
    latents = sampler.add_noise(z0, noise, start)  # x_t0 = √ᾱ_t0 z0 + √(1−ᾱ_t0) ε
    predict = guided_unet(model.unet, context, cfg.guidance, sampler, added)
    return denoise(sampler, predict, latents, generator, start=start, hooks=hooks, progress=progress)
