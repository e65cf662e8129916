"""Sampling with ControlNets: conditioning scales, guess mode, several ControlNets, classifier-free guidance.

Paper: *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao, Agrawala), docs/methods.md §7.2.

- Normal mode: every residual of ControlNet n is scaled by its strength s_n; both CFG halves get control
  (the original runs the two halves as separate passes, diffusers batches [uncond; cond] with the hint
  duplicated; the same numbers).
- Guess mode (no prompt needed): the unconditional half gets **no** control and the residuals ramp from
  shallow to deep, k = 0..K−1 (K = 13 for SD, k = K−1 the middle block):
      original (cldm):  s_k = s·0.825^(K−1−k)          (0.0994 … 1)
      diffusers:        s_k = s·logspace(−1, 0, K)_k   (0.1 … 1)
- Several ControlNets: their residuals add up, r_k = Σ_n s_{n,k}·r_{n,k} (diffusers MultiControlNetModel).
- A ControlNet acts only on the steps i with start ≤ i/N and (i+1)/N ≤ end (diffusers control_guidance_start
  / _end): keep_i = 1 − [i/N < start or (i+1)/N > end].
- CFG as usual (ldm.pipeline.classifier_free_guidance), ε = UNet(x, t, c, skips + r, mid + r_mid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ldm.hooks import guidance_batch, join_guidance, split_guidance
from ldm.model import StableDiffusion
from ldm.pipeline import (Predictor, SamplingConfig, check_image_size, classifier_free_guidance, denoise, guided,
                          initial_noise, prompt_conditioning, sampler_for)
from ldm.sdxl import MicroConditioning
from ldm.unet import TextTime

from .controlnet import ControlNet

GUESS_RATIO = 0.825  # cldm.py: control_scales = [strength * 0.825 ** (12 - i) for i in range(13)]
GUESS_RULES = ("diffusers", "original")


def guess_mode_scales(n: int, strength: float = 1.0, rule: str = "diffusers") -> list[float]:
    """Per-residual scales of guess mode, shallowest first, the middle block last."""
    if rule == "original":
        return [strength * GUESS_RATIO ** (n - 1 - k) for k in range(n)]  # s·0.825^(K−1−k)
    if rule == "diffusers":
        return (strength * torch.logspace(-1, 0, n)).tolist()  # s·10^(−1 + k/(K−1))
    raise ValueError(f"unknown guess-mode rule {rule!r}; choose one of {', '.join(GUESS_RULES)}")


@dataclass(frozen=True)
class Control:
    """One ControlNet with its hint and strength."""

    net: ControlNet
    hint: torch.Tensor  # [1 or B, 3, H, W] in [0, 1], H×W = the image size
    scale: float = 1.0  # s_n (diffusers controlnet_conditioning_scale)
    start: float = 0.0  # fraction of the steps before the ControlNet starts acting
    end: float = 1.0  # fraction of the steps after which it stops

    def __post_init__(self):
        if self.hint.ndim != 4 or self.hint.shape[1] != self.net.control_config.conditioning_channels:
            raise ValueError(f"hint must be [B, 3, H, W], got shape {tuple(self.hint.shape)}; make it with "
                             "controls.to_hint or controls.canny_hint")
        low, high = self.hint.min().item(), self.hint.max().item()
        if not 0 <= low <= high <= 1:  # also catches NaN
            raise ValueError(f"hint values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; ControlNet hints "
                             "are never normalised to [-1, 1] (use controls.to_hint)")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"need 0 <= start < end <= 1, got start={self.start}, end={self.end}")

    def keep(self, i: int, n_steps: int) -> float:
        """1 on the steps where this ControlNet acts, else 0."""
        return float(not (i / n_steps < self.start or (i + 1) / n_steps > self.end))


def control_residuals(controls: Sequence[Control], x: torch.Tensor, t, context: torch.Tensor, i: int,
                      n_steps: int, guess_mode: bool = False, guess_rule: str = "diffusers",
                      added: TextTime | None = None):
    """Σ_n of every ControlNet's residuals for latents ``x`` [B, ...]: (down list, mid)."""
    down_sum, mid_sum = None, None
    for control in controls:
        strength = control.scale * control.keep(i, n_steps)
        n = control.net.control_config.n_residuals
        scales = guess_mode_scales(n, strength, guess_rule) if guess_mode else strength
        hint = control.hint.to(x.device, x.dtype)
        hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)  # [1 or B, ...] -> [B or 2B, ...] (every row)
        down, mid = control.net(x, t, context, hint, scales, **({} if added is None else {"added": added}))
        if down_sum is None:
            down_sum, mid_sum = down, mid
        else:
            down_sum, mid_sum = [a + b for a, b in zip(down_sum, down)], mid_sum + mid  # r_k = Σ_n s_{n,k}·r_{n,k}
    return down_sum, mid_sum


def controlled_unet(unet, controls: Sequence[Control], context: torch.Tensor, guidance: float | Sequence[float],
                    sampler, guess_mode: bool = False, guess_rule: str = "diffusers",
                    control_uncond: bool | None = None, rescale: float = 0.0,
                    added: TextTime | None = None) -> Predictor:
    """predict(x_in, t) for ``ldm.pipeline.denoise``: CFG over the UNet with ControlNet residuals; the
    ControlNet sees the same scaled input as the UNet (diffusers PR #3571). ``guidance`` is one scale or one
    per row; ``sampler`` gives the step index of t (a ControlNet acts on a window of steps).

    :param context: [uncond; cond] text states under guidance (``text_context``), else cond only
    :param control_uncond: whether the unconditional half gets control; default: yes, except in guess mode
    :param added: SDXL's added conditioning, rows matching ``context`` (None for SD 1.x/2.x)
    """
    control_uncond = (not guess_mode) if control_uncond is None else control_uncond
    extra = {} if added is None else {"added": added}  # SD 1.x/2.x UNets (and wrappers of them) take no added
    n_steps = len(sampler.timesteps)
    step_of = {}
    for i, t in enumerate(sampler.timesteps.tolist()):
        step_of.setdefault(t, i)
    if guess_rule not in GUESS_RULES:
        raise ValueError(f"unknown guess-mode rule {guess_rule!r}; choose one of {', '.join(GUESS_RULES)}")

    def residuals(x_in, t, ctx, i, rows_added=added):
        return control_residuals(controls, x_in, t, ctx, i, n_steps, guess_mode, guess_rule, rows_added)

    def predict(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = step_of[t.item()]
        if not guided(guidance):
            down, mid = residuals(x_in, t, context, i)
            return unet(x_in, t, context, down, mid, **extra)
        x_both = guidance_batch(x_in)  # [B, ...] -> [2B, ...]: [uncond × B; cond × B]
        if control_uncond:
            down, mid = residuals(x_both, t, context, i)
        else:  # guess mode: control only the conditional half, zeros for the unconditional one
            cond_added = None if added is None else added.rows(slice(x_in.shape[0], None))
            down, mid = residuals(x_in, t, split_guidance(context)[1], i, cond_added)
            down = [join_guidance(torch.zeros_like(r), r) for r in down]
            mid = join_guidance(torch.zeros_like(mid), mid)
        # y = F(x) + Z(F'(x + Z(c))): the locked UNet adds the residuals to its skips and middle block
        uncond, cond = split_guidance(unet(x_both, t, context, down, mid, **extra))  # [2B, ...] -> 2 × [B, ...]
        return classifier_free_guidance(uncond, cond, guidance, rescale)

    return predict


@torch.no_grad()
def controlnet_to_image(model: StableDiffusion, controls: Sequence[Control], prompts: Sequence[str],
                        cfg: SamplingConfig = SamplingConfig(), negative: str | Sequence[str] | None = None,
                        guess_mode: bool = False, guess_rule: str = "diffusers", control_uncond: bool | None = None,
                        hooks: Sequence = (), progress: bool = True, micro: MicroConditioning | None = None
                        ) -> torch.Tensor:
    """Text to image under ControlNet control; returns the final latents (``decode_latents`` for images).
    The random draws are those of ``ldm.pipeline.text_to_image`` (and of diffusers' ControlNet pipeline)."""
    if not controls:
        raise ValueError("no ControlNet given; use ldm.pipeline.text_to_image for plain generation")
    factor = model.config.vae.downsample_factor
    check_image_size(cfg.height, cfg.width, factor)
    for control in controls:
        if control.net.control_config.unet.level_channels != model.config.unet.level_channels or \
                control.net.control_config.unet.context_dim != model.config.unet.context_dim:
            raise ValueError("the ControlNet was made for another UNet (channels or text width differ); "
                             "use a ControlNet trained for this base model")
        if control.net.control_config.hint_factor != factor:
            raise ValueError(f"the ControlNet's hint encoder downsamples {control.net.control_config.hint_factor}x "
                             f"but the model's VAE {factor}x; they must match")
        if tuple(control.hint.shape[-2:]) != (cfg.height, cfg.width):
            raise ValueError(f"hint size {tuple(control.hint.shape[-2:])} differs from the image size "
                             f"{(cfg.height, cfg.width)}; make the hint at the image size (controls.to_hint)")
        if control.hint.shape[0] not in (1, len(prompts)):
            raise ValueError(f"{control.hint.shape[0]} hints for {len(prompts)} prompts; give one or one per prompt")
    sampler = sampler_for(model, cfg)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    context, added = prompt_conditioning(model, prompts, negative, cfg.guidance, cfg.height, cfg.width, micro)
    latents = initial_noise(model, len(prompts), cfg.height, cfg.width, generator, context.dtype)
    latents = latents * sampler.init_noise_sigma
    predict = controlled_unet(model.unet, controls, context, cfg.guidance, sampler, guess_mode, guess_rule,
                              control_uncond, cfg.guidance_rescale, added)
    return denoise(sampler, predict, latents, generator, hooks=hooks, progress=progress)
