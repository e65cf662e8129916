"""Text-guided editing of real images from edit-friendly DDPM noise maps.

Paper: *An Edit Friendly DDPM Noise Space: Inversion and Manipulations* (Huberman-Spiegelglas, Kulikov &
Michaeli, CVPR 2024), text-guided editing of real images. Reference code:
inbarhub/DDPM_inversion main_run.py (docs/methods.md §4.1).

1. Invert the image under the source prompt at w_src (``inversion.ddpm_noise.invert``): latents x_t and
   noise maps z_t that regenerate it exactly.
2. Edit: start from the stored x at step T_skip and run the same DDPM sampler with the *target* prompt at
   w_tar, adding the stored σ_t z_t at every step:

       x_p = √ᾱ_p x̂0(x_t; target, w_tar) + √(1−ᾱ_p−σ_t²) ε̂(x_t; target, w_tar) + σ_t z_t

   The noise maps carry the image's structure ("imprinted" in them), so the layout survives while the
   prompt changes the content. Paper defaults: 100 steps, η = 1, w_src 3.5, w_tar 15, T_skip 36 (start at
   t = 631). Source prompt + w_src + T_skip 0 reproduces the input (``reconstruct``).
3. Diversity: the auxiliary path draws random ε̃_t, so each inversion gives different noise maps of the same
   image, hence different edits of it. ``invert_and_edit(samples=N)`` inverts N copies at once, copy k
   with its own generator (seed + k), and edits them in one batch.
4. "Ours + P2P" (``edit_with_controller``): the source and target prompts run side by side from the same
   inverted latent and the same noise maps while a Prompt-to-Prompt controller edits the target row's
   attention (defaults: T_skip 12, w_tar 9, Replace or Refine, cross-attention replaced in the first
   ⌊0.6·N⌋ regenerated steps, self-attention in the first ⌊0.2·N⌋, N = all steps: main_run.py ``p2pinv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from inversion.ddpm_noise import DDPMInversion, DDPMInversionConfig, check_skip, invert, regenerate
from ldm.attention import attached
from ldm.hooks import AttentionHook, StepHook
from ldm.pipeline import check_image_size, encode_images, guided_unet, latent_conditioning
from ldm.sdxl import MicroConditioning

from ..p2p import P2PConfig, build_controller


@dataclass(frozen=True)
class DDPMEditConfig:
    skip: int = 36  # T_skip: first steps not regenerated; 36 of 100 starts at t = 631 (main_run.py)
    target_guidance: float = 15.0  # w_tar (cfg_tar); README range 7-18


@dataclass(frozen=True)
class DDPMP2PConfig:
    """The paper's "ours + P2P" mode (``p2pinv`` in main_run.py, README values)."""

    skip: int = 12  # starts at t = 871 on the 100-step grid
    target_guidance: float = 9.0
    cross_replace: float = 0.6  # fraction of steps with the target's cross-attention maps replaced
    self_replace: float = 0.2  # fraction of steps with the self-attention maps injected


def _prompts(prompts: str | Sequence[str], count: int) -> list[str]:
    return [prompts] * count if isinstance(prompts, str) else list(prompts)


@torch.no_grad()
def edit_inversion(model, inversion: DDPMInversion, target_prompts: str | Sequence[str],
                   cfg: DDPMEditConfig = DDPMEditConfig(), hooks: Sequence = (),
                   progress: bool = False) -> torch.Tensor:
    """Regenerate from step ``cfg.skip`` with the stored noise maps under the target prompt(s) at
    ``cfg.target_guidance``; returns the final latents [B, C, h, w].

    One prompt edits every row of the inversion; several prompts on a batch-1 inversion share its maps. SDXL:
    the target prompts' pooled embeddings and the inversion's size/crop numbers go to every step."""
    check_skip(cfg.skip, inversion.num_steps)
    rows = inversion.latents.shape[1]
    prompts = _prompts(target_prompts, rows)
    if rows != 1 and len(prompts) != rows:
        raise ValueError(f"{len(prompts)} target prompts for an inversion of batch {rows}; give one or {rows}")
    context, added = latent_conditioning(model, prompts, None, cfg.target_guidance, inversion.latents[0],
                                         inversion.micro)
    predict = guided_unet(model.unet, context, cfg.target_guidance, added=added)
    return regenerate(predict, inversion, cfg.skip, hooks=hooks, batch=len(prompts), progress=progress)


def reconstruct(model, inversion: DDPMInversion, progress: bool = False) -> torch.Tensor:
    """Regenerate the inverted latents x0 (source prompts, source guidance, no skip): exact up to rounding."""
    cfg = DDPMEditConfig(skip=0, target_guidance=inversion.source_guidance)
    return edit_inversion(model, inversion, list(inversion.source_prompts), cfg, progress=progress)


def sample_generators(seed: int, samples: int) -> list[torch.Generator]:
    """One CPU generator per sample (seed, seed + 1, …): sample k does not depend on how many are drawn."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(samples)]


@torch.no_grad()
def ddpm_invert_image(model, images: torch.Tensor, source_prompt: str,
                      cfg: DDPMInversionConfig = DDPMInversionConfig(), seed: int = 0, samples: int = 1,
                      progress: bool = False, micro: MicroConditioning | None = None) -> DDPMInversion:
    """Invert one image [1, 3, H, W] in [0, 1] ``samples`` times (a batch of independent auxiliary paths).

    The image is encoded with the posterior mode, 0.18215-scaled (SDXL 0.13025; both references).
    ``micro``: SDXL's size/crop conditioning (default: the image size, crop (0, 0))."""
    if images.ndim != 4 or images.shape[0] != 1:
        raise ValueError(f"give one image [1, 3, H, W], got shape {tuple(images.shape)}")
    check_image_size(images.shape[-2], images.shape[-1], model.config.vae.downsample_factor)
    x0 = encode_images(model, images).expand(samples, -1, -1, -1)
    return invert(model, x0, source_prompt, cfg, sample_generators(seed, samples), progress=progress, micro=micro)


def invert_and_edit(model, images: torch.Tensor, source_prompt: str, target_prompt: str,
                    inversion_cfg: DDPMInversionConfig = DDPMInversionConfig(),
                    edit_cfg: DDPMEditConfig = DDPMEditConfig(), seed: int = 0, samples: int = 1,
                    progress: bool = False) -> tuple[torch.Tensor, DDPMInversion]:
    """``samples`` diverse edits of one image: (latents [samples, C, h, w], the batched inversion)."""
    inversion = ddpm_invert_image(model, images, source_prompt, inversion_cfg, seed, samples, progress)
    return edit_inversion(model, inversion, target_prompt, edit_cfg, progress=progress), inversion


class ExecutedSteps(StepHook):
    """Step hooks of a controller, re-indexed by executed step: i − skip = 0, 1, …, N − skip − 1.

    The reference (``p2pinv``) counts a P2P schedule built for all N steps from the first regenerated step
    (xa 0.6 → the first ⌊0.6·N⌋ executed steps), and so do the controllers driven through this adapter."""

    def __init__(self, controller: AttentionHook, skip: int):
        self.controller, self.skip = controller, skip

    def begin_step(self, i: int, t) -> None:
        self.controller.begin_step(i - self.skip, t)

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        return self.controller.end_step(i - self.skip, t, latents)


@torch.no_grad()
def edit_with_controller(model, inversion: DDPMInversion, source_prompt: str, target_prompt: str,
                         controller: AttentionHook,
                         cfg: DDPMP2PConfig = DDPMP2PConfig(), select=None, progress: bool = False) -> torch.Tensor:
    """Edit-friendly inversion combined with an attention controller (the paper's "ours + P2P").

    Batch [source; target] starts from the same latent x at step ``cfg.skip`` and adds the same σ_t z_t to
    both rows; the source row runs at the inversion's w_src (so it follows the inverted image) and the
    target row at ``cfg.target_guidance``. The UNet sees [uncond × 2; source, target]. ``controller`` is any
    ``ldm.hooks.AttentionHook``, attached to the ``select``ed layers; its step hooks ``begin_step(i, t)`` /
    ``end_step(i, t, latents)`` get the executed-step index (``ExecutedSteps``).
    Returns the final latents [2, C, h, w] (source, target).
    """
    if inversion.latents.shape[1] != 1:
        raise ValueError(f"edit_with_controller takes a batch-1 inversion, got batch {inversion.latents.shape[1]}; "
                         "pass inversion.row(k)")
    check_skip(cfg.skip, inversion.num_steps)
    prompts = [source_prompt, target_prompt]
    guidance = [inversion.source_guidance, cfg.target_guidance]
    context, added = latent_conditioning(model, prompts, None, guidance, inversion.latents[0], inversion.micro)
    predict = guided_unet(model.unet, context, guidance, added=added)
    with attached(model.unet, controller, select):
        return regenerate(predict, inversion, cfg.skip, hooks=[ExecutedSteps(controller, cfg.skip)], batch=2,
                          progress=progress)


def p2p_controller(model, source_prompt: str, target_prompt: str, num_steps: int, latent_hw: tuple[int, int],
                   cfg: DDPMP2PConfig = DDPMP2PConfig()):
    """The reference's P2P controller for ``p2pinv``: Replace when the prompts have as many words, else
    Refine; cross-attention replaced in the first ⌊N·cross⌋ executed steps, self-attention in the first
    ⌊N·self⌋ (N = all inversion steps, as the reference), no local blend, no attention store."""
    words = [len(model.tokenizer.word_positions(prompt)) for prompt in (source_prompt, target_prompt)]
    p2p = P2PConfig(mode="swap" if words[0] == words[1] else "refine", cross_replace=cfg.cross_replace,
                    self_replace=(0.0, cfg.self_replace), store=False)
    return build_controller(model, [source_prompt, target_prompt], num_steps, latent_hw, p2p).to(model.device)


def edit_with_p2p(model, inversion: DDPMInversion, source_prompt: str, target_prompt: str,
                  cfg: DDPMP2PConfig = DDPMP2PConfig(), progress: bool = False) -> torch.Tensor:
    """"Ours + P2P" with editlab's Prompt-to-Prompt controller; returns latents [2, C, h, w] (source, target)."""
    latent_hw = tuple(inversion.latents.shape[-2:])
    controller = p2p_controller(model, source_prompt, target_prompt, inversion.num_steps, latent_hw, cfg)
    return edit_with_controller(model, inversion, source_prompt, target_prompt, controller, cfg, progress=progress)
