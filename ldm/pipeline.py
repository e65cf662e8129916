"""Sampling: text to image with classifier-free guidance, and SDEdit (image to image).

Classifier-free guidance (*Classifier-Free Diffusion Guidance*, Ho & Salimans), with optional guidance rescale
(*Common Diffusion Noise Schedules and Sample Steps are Flawed*, Lin et al., §3.4):

    ε̂ = ε_u + w_b·(ε_c − ε_u)        per row b, one UNet call on the rows [uncond × B; cond × B], as diffusers
                                   (ldm.hooks.guidance_rows names this layout for every hook)
    ε̂ ← φ·ε̂·std(ε_c)/std(ε̂) + (1 − φ)·ε̂      (guidance rescale φ; std per sample)

Guidance runs when any row's scale w_b is above 1; otherwise the conditional rows run alone.

SDEdit (*SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations*, Meng et al.):
encode the image, z0 = s·E(x).sample() (s = 0.18215, SDXL 0.13025); noise it to the first kept step
(``Sampler.add_noise``, e.g. x_{t0} = √ᾱ_{t0} z0 + √(1−ᾱ_{t0}) ε), then sample as usual from there, with any
sampler, as diffusers' img2img (docs/methods.md §5).

Random draws follow diffusers exactly, on one CPU ``torch.Generator``: the initial latents
``randn((B, 4, H/8, W/8))`` (SDEdit: the posterior sample, then the noise), then each step's noise in the
sampler. So the same seed, scheduler and weights give the same image in both.

SDXL takes the same path: ``prompt_conditioning`` adds its pooled text embedding and size/crop numbers
(ldm/sdxl.py), which travel beside the context to every UNet call.

Every method samples with ``denoise``, the one sampling loop: it scales the input for the sampler once
(``scale_model_input``) and calls a predictor ``predict(x_in, t)``, a function of the model input and timestep
only (here CFG over the UNet; InstructPix2Pix and ControlNet bring their own), then ``sampler.step``. Optional
step hooks (``ldm.hooks.StepHook``: ``begin_step(i, t)`` and ``end_step(i, t, latents) -> latents``;
Prompt-to-Prompt counts steps and blends latents there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .hooks import StepHook, guidance_batch, join_guidance, split_guidance
from .model import StableDiffusion
from .schedulers import NoiseSchedule, gaussian_noise, sampler_from_config, standard_scheduler_config
from .sdxl import MicroConditioning
from .sdxl import conditioning as sdxl_conditioning
from .unet import TextTime

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # predict(x_in, t) -> model output


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    guidance: float = 7.5  # w; CFG runs only when w > 1 (as diffusers)
    scheduler: str = "ddim"  # any name of ldm.schedulers.SAMPLERS, or an AUTOMATIC1111 name
    eta: float = 0.0  # DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like)
    seed: int = 0
    height: int = 512
    width: int = 512
    spacing: str | None = None  # "leading", "linspace", "trailing"; None: the model's config, else the sampler's
    karras: bool | None = None  # Karras σ; None: the model's config
    rescale_zero_snr: bool | None = None  # zero-terminal-SNR betas; None: the model's config
    guidance_rescale: float = 0.0  # φ of Lin et al. (0.7 recommended with zero-SNR v models); 0: off


def check_image_size(height: int, width: int, factor: int) -> None:
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} is not a multiple of {factor} (the VAE's downsampling "
                         f"factor); choose sizes such as {max(factor, width // factor * factor)}x"
                         f"{max(factor, height // factor * factor)}")


def guided(guidance: float | Sequence[float] | torch.Tensor) -> bool:
    """Classifier-free guidance runs when any scale is above 1 (as diffusers); w ≤ 1 everywhere runs the
    conditional rows alone."""
    return max(torch.as_tensor(guidance, dtype=torch.float32).flatten().tolist()) > 1.0


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance: float | Sequence[float] | torch.Tensor,
                             rescale: float = 0.0) -> torch.Tensor:
    """ε̂ = ε_u + w_b(ε_c − ε_u) with one scale or one per row b, then guidance rescale φ (Lin et al. §3.4):
    ε̂ ← φ·ε̂·std(ε_c)/std(ε̂) + (1 − φ)·ε̂. Works on ε or v outputs alike."""
    scales = torch.as_tensor(guidance, dtype=torch.float32).flatten()
    if len(scales) not in (1, cond.shape[0]):
        raise ValueError(f"{len(scales)} guidance scales for a batch of {cond.shape[0]}; give one or one per row")
    w = scales.to(cond.device, cond.dtype).view(-1, *[1] * (cond.ndim - 1)) if len(scales) > 1 else float(scales)
    out = uncond + w * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * rescaled + (1 - rescale) * out
    return out


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


def latent_conditioning(model: StableDiffusion, prompts: Sequence[str], negative: str | Sequence[str] | None,
                        guidance: float | Sequence[float], latents: torch.Tensor,
                        micro: MicroConditioning | None = None) -> tuple[torch.Tensor, TextTime | None]:
    """``prompt_conditioning`` for work that starts from latents [B, C, h, w] (inversions, their edits): the
    image size SDXL's micro-conditioning defaults to is the latent size times the VAE's factor."""
    f = model.config.vae.downsample_factor
    return prompt_conditioning(model, prompts, negative, guidance, latents.shape[-2] * f, latents.shape[-1] * f, micro)


def guided_added(uncond: TextTime | None, cond: TextTime | None, batch: int) -> TextTime | None:
    """SDXL's added conditioning of a guided batch [uncond × B; cond × B] from one row of each (None for
    SD 1.x/2.x, which have none)."""
    if uncond is None or cond is None:
        return None
    return TextTime.cat([uncond.repeat(batch), cond.repeat(batch)])


def guided_unet(unet, context: torch.Tensor, guidance: float | Sequence[float], rescale: float = 0.0,
                added: TextTime | None = None) -> Predictor:
    """predict(x_in, t): classifier-free guidance over one UNet call on [uncond; cond] (or the plain
    conditional output when every w ≤ 1). ``guidance`` is one scale or one per row (Prompt-to-Prompt batches
    run the source at w_src and the edit at w_tar); ``rescale``: guidance rescale φ. ``added``: SDXL's pooled
    embedding and micro-conditioning, rows matching ``context``."""
    extra = {} if added is None else {"added": added}  # SD 1.x/2.x UNets (and wrappers of them) take three inputs

    def predict(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided(guidance):
            return unet(x_in, t, context, **extra)
        uncond, cond = split_guidance(unet(guidance_batch(x_in), t, context, **extra))  # [uncond × B; cond × B]
        return classifier_free_guidance(uncond, cond, guidance, rescale)

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
        x_in = sampler.scale_model_input(latents, i)  # the model's input scaling, once, here
        latents = sampler.step(predict(x_in, t), i, latents, generator)
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


def scheduler_config_of(model: StableDiffusion) -> dict:
    """The schedule the model's weights carry (see ldm.schedulers.from_config); SD's standard one if none."""
    return getattr(model, "scheduler_config", None) or standard_scheduler_config(model.config.prediction_type)


def noise_schedule_of(model: StableDiffusion) -> NoiseSchedule:
    """β_t and ᾱ_t the model was trained with (its scheduler config): what its losses, inversions and samplers
    must use, e.g. a zero-terminal-SNR fine-tune's rescaled betas rather than SD's standard ones."""
    return NoiseSchedule.from_config(scheduler_config_of(model))


def sampler_for(model: StableDiffusion, cfg: SamplingConfig, scheduler: str | None = None, spacing: str | None = None):
    """The sampler ``cfg`` names, on the model's own schedule (its weights' scheduler config) and prediction
    type; ``cfg``'s spacing, Karras and zero-SNR choices override the model's. ``scheduler``/``spacing``
    replace cfg's (methods with their own defaults, e.g. InstructPix2Pix's log-linear Euler grid)."""
    return sampler_from_config(scheduler or cfg.scheduler, scheduler_config_of(model), cfg.steps, eta=cfg.eta,
                               prediction_type=model.config.prediction_type, spacing=spacing or cfg.spacing,
                               karras=cfg.karras, zero_terminal_snr=cfg.rescale_zero_snr)


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
    predict = guided_unet(model.unet, context, cfg.guidance, cfg.guidance_rescale, added)
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
    latents = sampler.add_noise(z0, noise, start)  # x_t0 = √ᾱ_t0 z0 + √(1−ᾱ_t0) ε (σ samplers: z0 + σ ε)
    predict = guided_unet(model.unet, context, cfg.guidance, cfg.guidance_rescale, added)
    return denoise(sampler, predict, latents, generator, start=start, hooks=hooks, progress=progress)
