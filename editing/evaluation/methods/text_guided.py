"""Adapters of the text-guided methods: a case's source image, source prompt and target prompt in, the edit out.

- p2p-ddim / p2p-null-text: Prompt-to-Prompt (Hertz et al., 2023) on DDIM inversion or on null-text inversion
  (Mokady et al., 2023); word swap when the prompts have as many words, else refinement; local blend on the
  case's edited words when both are known (as PIE-Bench runs it). Row 0 is the reconstruction.
- ddpm-edit / ddpm-p2p: edit-friendly DDPM inversion (Huberman-Spiegelglas et al., 2024), alone or with P2P.
- sdedit: SDEdit (Meng et al., 2022) from the source image at ``strength`` under the target prompt.
Defaults suit the toy model (64×64, few steps); sweep them for SD.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from editing.ddpm_edit.editor import DDPMEditConfig, DDPMP2PConfig, ddpm_invert_image, edit_inversion, edit_with_p2p
from editing.p2p.edit import P2PConfig, invert_image, prompt_to_prompt, resolve_map_level, resolve_self_level
from inversion.ddpm_noise import DDPMInversionConfig
from inversion.null_text import NullTextConfig
from ldm.pipeline import SamplingConfig, decode_latents, sdedit

from .base import MethodOutput, image_size, need_prompts


@dataclass(frozen=True)
class P2PParams:
    steps: int = 20
    guidance: float = 7.5
    cross_replace: float = 0.8  # fraction of steps with the source's cross-attention maps
    self_replace: float = 0.5  # fraction of steps with the source's self-attention maps
    blend: bool = True  # local blend on the case's edited words
    blend_threshold: float = 0.3
    inner_steps: int = 10  # null-text: Adam iterations per step


def _word_count(tokenizer, prompt: str) -> int:
    return len(tokenizer.word_positions(prompt))


def run_p2p(resources, case, params: P2PParams, seed: int, inversion: str) -> MethodOutput:
    need_prompts(case)
    model = resources.model()
    height, width = image_size(model, case)
    cfg = SamplingConfig(steps=params.steps, guidance=params.guidance, scheduler="ddim", seed=seed,
                         height=height, width=width)
    counts = {_word_count(model.tokenizer, p) for p in (case.source_prompt, case.target_prompt)}
    blend = tuple(w for w in case.words if w) if params.blend and all(case.words) else ()
    config = P2PConfig(mode="swap" if len(counts) == 1 else "refine", cross_replace=params.cross_replace,
                       self_replace=(0.0, params.self_replace), blend_words=blend,
                       blend_threshold=params.blend_threshold, blend_start=0.2, store=False, self_above_map=1)
    map_level = resolve_map_level(model, config)  # a real image: self-attention from one level above (SD)
    config = dataclasses.replace(config, map_level=map_level,
                                 self_min_level=resolve_self_level(config, map_level, model.unet))
    null_config = NullTextConfig(guidance=params.guidance, inner_steps=params.inner_steps)
    inverted = invert_image(model, case.image[None].to(model.device), case.source_prompt, cfg, inversion, batch=2,
                            null_config=null_config)
    result = prompt_to_prompt(model, case.source_prompt, case.target_prompt, cfg, config, noise=inverted.noise,
                              null_embeddings=inverted.null_embeddings)
    reconstruction, edited = decode_latents(model, result.latents).cpu()
    return MethodOutput(edited, reconstruction)


@dataclass(frozen=True)
class DDPMParams:
    steps: int = 50
    skip: int = 35  # T_skip: steps not regenerated (toy: start late, the demo's setting)
    source_guidance: float = 3.5  # w_src while inverting
    target_guidance: float = 7.5  # w_tar while editing
    cross_replace: float = 0.6  # ddpm-p2p only
    self_replace: float = 0.2  # ddpm-p2p only


def run_ddpm(resources, case, params: DDPMParams, seed: int, p2p: bool) -> MethodOutput:
    need_prompts(case)
    model = resources.model()
    image_size(model, case)
    if not 0 <= params.skip < params.steps:
        raise ValueError(f"ddpm skip {params.skip} must lie in [0, steps={params.steps})")
    inversion_cfg = DDPMInversionConfig(steps=params.steps, source_guidance=params.source_guidance)
    inversion = ddpm_invert_image(model, case.image[None].to(model.device), case.source_prompt, inversion_cfg, seed)
    if p2p:
        cfg = DDPMP2PConfig(skip=params.skip, target_guidance=params.target_guidance,
                            cross_replace=params.cross_replace, self_replace=params.self_replace)
        reconstruction, edited = decode_latents(model, edit_with_p2p(model, inversion, case.source_prompt,
                                                                     case.target_prompt, cfg)).cpu()
        return MethodOutput(edited, reconstruction)
    latents = edit_inversion(model, inversion, case.target_prompt, DDPMEditConfig(params.skip, params.target_guidance))
    return MethodOutput(decode_latents(model, latents)[0].cpu())


@dataclass(frozen=True)
class SDEditParams:
    steps: int = 20
    guidance: float = 7.5
    strength: float = 0.6  # t0 as a fraction of the schedule


def run_sdedit(resources, case, params: SDEditParams, seed: int) -> MethodOutput:
    need_prompts(case)
    model = resources.model()
    height, width = image_size(model, case)
    cfg = SamplingConfig(steps=params.steps, guidance=params.guidance, scheduler="ddim", seed=seed,
                         height=height, width=width)
    latents = sdedit(model, case.image[None].to(model.device), [case.target_prompt], params.strength, cfg,
                     progress=False)
    return MethodOutput(decode_latents(model, latents)[0].cpu())

