"""DDIM inversion: run deterministic DDIM backwards, from an image latent to the noise that regenerates it.

Paper: *Denoising Diffusion Implicit Models* (Song, Meng & Ermon, 2021), eq. 12 with η = 0, read from the
current timestep c to the next one n = c + 1000//N (docs/methods.md §2; google/prompt-to-prompt
null_text_w_ptp.ipynb ``next_step``):

    ε   = ε_θ(z_c, n, context)                 current latent, next timestep (the usual linearisation)
    x̂0  = (z_c − √(1−ᾱ_c)·ε) / √ᾱ_c            ᾱ_c = ᾱ_0 when c < 0
    z_n = √ᾱ_n·x̂0 + √(1−ᾱ_n)·ε

It walks the grid of the DDIM sampler that will regenerate the image (editlab's SD grid t = 1, 21, …, 981 for
N = 50, so inversion and sampling meet on the same timesteps), returning the pivots z*_0 = z0, …, z*_N.
Guidance is an explicit argument (the references disagree: 1 in the null-text notebook, 3.5 in
DDPM_inversion); at w = 1 only the conditional branch runs. v-prediction output is converted to ε first.
SDXL: every UNet call also gets the prompt's pooled embedding and the six size/crop numbers (ldm/sdxl.py; by
default the image size and crop (0, 0)); without a negative prompt its unconditional branch is zeros.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.model import StableDiffusion
from ldm.pipeline import denoise, guided_unet, latent_conditioning, noise_schedule_of
from ldm.schedulers import DDIMSampler, ddim_update, predict_eps_x0
from ldm.sdxl import MicroConditioning


def inversion_sampler(model: StableDiffusion, steps: int) -> DDIMSampler:
    """The deterministic DDIM sampler (η = 0, SD's leading grid with offset 1) used to invert and to edit."""
    return DDIMSampler(noise_schedule_of(model), steps, eta=0.0, prediction_type=model.config.prediction_type)


def check_deterministic(sampler) -> None:
    if not isinstance(sampler, DDIMSampler) or sampler.eta != 0:
        raise ValueError("inversion needs the deterministic DDIM sampler (scheduler 'ddim', eta 0); "
                         f"got {getattr(sampler, 'name', type(sampler).__name__)} with eta "
                         f"{getattr(sampler, 'eta', 'n/a')}")


def ddim_inversion_step(eps: torch.Tensor, z: torch.Tensor, alpha_bar_current, alpha_bar_next) -> torch.Tensor:
    """z_n = √ᾱ_n·x̂0 + √(1−ᾱ_n)·ε with x̂0 = (z_c − √(1−ᾱ_c)·ε)/√ᾱ_c: the DDIM η = 0 step run towards
    the larger t (with ε taken at t_n, the inversion's approximation)."""
    _, x0 = predict_eps_x0(eps, z, alpha_bar_current, "epsilon")
    return ddim_update(x0, eps, alpha_bar_next)


@torch.no_grad()
def ddim_invert(model: StableDiffusion, latents: torch.Tensor, prompt: str, sampler: DDIMSampler,
                guidance: float = 1.0, negative: str | None = None, progress: bool = False,
                micro: MicroConditioning | None = None) -> list[torch.Tensor]:
    """Pivots [z*_0 = latents, z*_1, …, z*_N] ([1, C, h, w] each); z*_N is the starting noise x_T.

    z*_k is the latent at the sampler's timestep t_{N−k} (k = 1 … N), i.e. the input of sampling step N − k.
    ``negative``: the unconditional branch when guidance > 1 (None: "" for SD 1.x/2.x, zeros for SDXL);
    ``micro``: SDXL's size/crop conditioning.
    """
    check_deterministic(sampler)
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"invert one latent [1, C, h, w] at a time, got {tuple(latents.shape)}")
    context, added = latent_conditioning(model, [prompt], negative, guidance, latents, micro)
    predict = guided_unet(model.unet, context, guidance, added=added)
    schedule = sampler.schedule
    z = latents.to(model.device, context.dtype)
    pivots = [z]
    for k in tqdm(reversed(range(len(sampler.timesteps))), total=len(sampler.timesteps), disable=not progress,
                  leave=False, desc="DDIM inversion"):
        t_next = sampler.timesteps[k]
        alpha_bar_next = schedule.alpha_bar(t_next).to(z)
        alpha_bar_current = schedule.alpha_bar(sampler.previous_timestep(k)).to(z)  # ᾱ_0 before the first
        output = predict(sampler.scale_model_input(z, k), t_next)
        eps, _ = predict_eps_x0(output, z, alpha_bar_next, sampler.prediction_type)
        z = ddim_inversion_step(eps, z, alpha_bar_current, alpha_bar_next)
        pivots.append(z)
    return pivots


@torch.no_grad()
def ddim_reconstruct(model: StableDiffusion, noise: torch.Tensor, prompt: str, sampler: DDIMSampler,
                     guidance: float, negative: str | None = None, progress: bool = False,
                     micro: MicroConditioning | None = None) -> torch.Tensor:
    """Sample from ``noise`` (e.g. the last pivot) with DDIM under the prompt: the plain reconstruction."""
    check_deterministic(sampler)
    context, added = latent_conditioning(model, [prompt], negative, guidance, noise, micro)
    return denoise(sampler, guided_unet(model.unet, context, guidance, added=added), noise, None, progress=progress)
