"""Prompt-to-Prompt editing, end to end: a source prompt and its edits sampled together from one noise, or a
real image inverted first (DDIM or null-text inversion) and then edited.

Papers: *Prompt-to-Prompt Image Editing with Cross Attention Control* (Hertz et al., ICLR 2023) and
*Null-text Inversion for Editing Real Images using Guided Diffusion Models* (Mokady et al., CVPR 2023).
Algorithm: docs/methods.md §1.1 (controllers.py has the formulas). Every row starts from the same noise x_T and,
for the stochastic samplers, draws the same per-step noise (one generator per row, all seeded alike), so the
rows differ only by their prompts and the edits; row 0 is then exactly what the same batch would give
without any controller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from inversion.ddim_inversion import ddim_invert, inversion_sampler
from inversion.null_text import NullTextConfig, null_text_inversion, null_text_predictor
from ldm.attention import attached, attention_layers
from ldm.model import StableDiffusion
from ldm.hooks import split_guidance
from ldm.pipeline import (SamplingConfig, check_image_size, denoise, encode_images, guided, guided_unet,
                          prompt_conditioning, sampler_for)
from ldm.schedulers import gaussian_noise

from .alignment import equalizer, refinement_mapper, replacement_mapper, word_positions_in
from .controllers import P2PController, Refine, Replace, Reweight
from .local_blend import LocalBlend
from .schedules import calls_for, cross_replace_alphas, default_map_level, self_replace_calls
from .store import AttentionStore

MODES = ("swap", "refine")


@dataclass(frozen=True)
class P2PConfig:
    """What to edit and when. Defaults: the Prompt-to-Prompt notebook (squirrel -> lion: cross 0.8, self 0.4;
    LocalBlend threshold 0.3 from the first step); ``REAL_IMAGE_CONFIG`` holds the null-text notebook's."""

    mode: str = "swap"  # "swap" (Replace: same word count) or "refine" (Refine: words added/removed)
    cross_replace: float = 0.8  # fraction of steps whose cross-attention is replaced
    cross_replace_words: Mapping[str, float] = field(default_factory=dict)  # per-word fractions
    self_replace: tuple[float, float] = (0.0, 0.4)  # self-attention replaced for steps in [s0·N, s1·N)
    reweight: Mapping[str, float] = field(default_factory=dict)  # word -> factor, chained after the mode
    blend_words: tuple[str, ...] = ()  # LocalBlend words, each looked up in every prompt; () = no blend
    blend_threshold: float = 0.3
    blend_start: float = 0.0  # first blended step as a fraction of N (null-text notebook: 0.2)
    map_level: int | None = None  # UNet level of stored / blended / shown maps (None: schedules.default_map_level)
    self_min_level: int | None = None  # self-attention replaced at levels >= this (None: see self_above_map)
    self_above_map: int = 0  # with self_min_level None: from this many levels above the map level (0: the map level)
    store: bool = True  # keep the maps for visualisation
    store_steps: bool = False  # also keep each step's own maps (AttentionStore.step_maps; a per-step viewer)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")


# Editing a real image: the null-text notebook's settings (self 0.5, self-attention also one level above the
# map level, i.e. SD's 32² maps, blending from 20% of the steps). edit_real_image and `editlab p2p --image` use it.
REAL_IMAGE_CONFIG = P2PConfig(self_replace=(0.0, 0.5), blend_start=0.2, self_above_map=1)


@dataclass
class P2PResult:
    prompts: list[str]
    latents: torch.Tensor  # [B, C, h, w] final latents; row 0 is the source
    maps: torch.Tensor | None  # [B, h', w', K] cross-attention at ``map_level`` (heads, layers, steps averaged)
    map_level: int
    controller: P2PController


def resolve_map_level(model: StableDiffusion, config: P2PConfig) -> int:
    levels = {layer.level for layer in attention_layers(model.unet).values() if layer.kind == "cross"}
    map_level = default_map_level(model.unet) if config.map_level is None else config.map_level
    if map_level not in levels:
        raise ValueError(f"map level {map_level} has no cross-attention layer; this UNet has levels {sorted(levels)}")
    return map_level


def resolve_self_level(config: P2PConfig, map_level: int, unet=None) -> int:
    """The lowest UNet level whose self-attention is replaced: ``self_min_level`` if given, else
    ``self_above_map`` levels above the map level (SD at 512 px: the P2P notebook's ≤ 16², the null-text
    notebook's ≤ 32²). On SDXL (``unet`` with "text_time" conditioning) it is the map level itself: SDXL's
    ports of both notebooks (RoyiRa/prompt-to-prompt-with-sdxl, ugiugi0823/Null-SDXL) replace self-attention
    in the ≤ 32² maps at 1024 px, which is the map level (latent/4); one level above is SDXL's finest
    attention level, 64² (4096 tokens)."""
    if config.self_min_level is not None:
        return config.self_min_level
    if unet is not None and getattr(unet.config, "addition_embed", None) == "text_time":
        return map_level
    return max(0, map_level - config.self_above_map)


def build_controller(model: StableDiffusion, prompts: Sequence[str], steps: int, latent_hw: tuple[int, int],
                     config: P2PConfig = P2PConfig()) -> P2PController:
    """The controller for ``prompts`` (row 0 = source) over ``steps`` UNet calls."""
    if len(prompts) < 2:
        raise ValueError("Prompt-to-Prompt needs a source prompt and at least one edited prompt")
    tokenizer, source, edits = model.tokenizer, prompts[0], list(prompts[1:])
    map_level = resolve_map_level(model, config)
    self_min_level = resolve_self_level(config, map_level, model.unet)
    if config.mode == "swap":
        cross_edit = Replace(torch.stack([replacement_mapper(tokenizer, source, e) for e in edits]))
    else:
        mappers, aligned = zip(*(refinement_mapper(tokenizer, source, e) for e in edits))
        cross_edit = Refine(torch.stack(mappers), torch.stack(aligned))
    if config.reweight:
        cross_edit = Reweight(equalizer(tokenizer, edits, config.reweight), cross_edit)
    alphas = cross_replace_alphas(tokenizer, edits, steps, config.cross_replace, config.cross_replace_words)
    store = (AttentionStore(len(prompts), latent_hw, {map_level}, keep_steps=config.store_steps)
             if config.store or config.store_steps or config.blend_words else None)
    blend = None
    if config.blend_words:
        token_masks = torch.zeros(len(prompts), tokenizer.max_length)
        for word in config.blend_words:
            for row, positions in enumerate(word_positions_in(tokenizer, prompts, word, "blend")):
                token_masks[row, positions] = 1.0
        blend = LocalBlend(token_masks, map_level, config.blend_threshold, calls_for(config.blend_start, steps))
    return P2PController(len(prompts), cross_edit, alphas, self_replace_calls(config.self_replace, steps),
                         self_min_level, store, blend)


@torch.no_grad()
def prompt_to_prompt(model: StableDiffusion, source: str, edits: str | Sequence[str],
                     sampling: SamplingConfig = SamplingConfig(), config: P2PConfig = P2PConfig(), *,
                     noise: torch.Tensor | None = None, null_embeddings: Sequence[torch.Tensor] | None = None,
                     attention_hooks: Sequence = (), negative: str | None = None, progress: bool = False) -> P2PResult:
    """Sample the source prompt and its edits together under a Prompt-to-Prompt controller.

    :param noise: x_T [1, C, h, w] shared by all rows (an inversion's last pivot); default: drawn from the seed
    :param null_embeddings: per-step unconditional embeddings [1, L, C] (null-text inversion)
    :param attention_hooks: extra attention hooks attached after the controller (they see the edited maps)
    :param negative: negative prompt of every row (not with null-text embeddings, which replace it)
    """
    prompts = [source] + ([edits] if isinstance(edits, str) else list(edits))
    sampler = sampler_for(model, sampling)
    generators = [torch.Generator("cpu").manual_seed(sampling.seed) for _ in prompts]  # same noise in every row
    f = model.config.vae.downsample_factor  # SDXL's size numbers: the inverted image's, else the sampled size
    height, width = (sampling.height, sampling.width) if noise is None else (noise.shape[-2] * f, noise.shape[-1] * f)
    # SDXL: both encoders share the 77 token positions, so one alignment serves
    # null-text: the unconditional rows are ∅_i with the empty prompt's pooled embedding (SDXL), as inverted
    context, added = prompt_conditioning(model, prompts, negative if null_embeddings is None else "",
                                         sampling.guidance, height, width)
    if null_embeddings is None:
        predict = guided_unet(model.unet, context, sampling.guidance, sampling.guidance_rescale, added)
    else:  # [∅ × B; P_0 … P_{B−1}] above; here ∅ is the learned embedding of each step (SDXL: the context only)
        if negative:
            raise ValueError("null-text inversion learns the unconditional embedding that a negative prompt "
                             "would set; drop --negative or invert with --inversion ddim")
        if len(null_embeddings) != sampling.steps:
            raise ValueError(f"{len(null_embeddings)} null embeddings for {sampling.steps} steps; invert with the same "
                             "number of steps")
        context = split_guidance(context)[1] if guided(sampling.guidance) else context  # the prompts' rows
        predict = null_text_predictor(model.unet, list(null_embeddings), context, sampling.guidance, sampler, added)
    if noise is None:
        check_image_size(sampling.height, sampling.width, f)
        shape = (len(prompts), model.config.vae.latent_channels, sampling.height // f, sampling.width // f)
        latents = gaussian_noise(shape, generators, model.device, context.dtype) * sampler.init_noise_sigma
    else:
        latents = noise.to(model.device, context.dtype).expand(len(prompts), -1, -1, -1)
    controller = build_controller(model, prompts, len(sampler), tuple(latents.shape[-2:]), config).to(model.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(attached(model.unet, controller))
        for hook in attention_hooks:
            stack.enter_context(attached(model.unet, hook))
        latents = denoise(sampler, predict, latents, generators, hooks=[controller], progress=progress)
    map_level = resolve_map_level(model, config)
    maps = controller.store.average_maps(map_level) if controller.store is not None else None
    return P2PResult(prompts, latents, maps, map_level, controller)


@dataclass
class Inversion:
    method: str  # "ddim" or "null-text"
    noise: torch.Tensor  # x_T = z*_N [1, C, h, w]
    null_embeddings: list[torch.Tensor] | None  # per-step ∅_i (null-text) or None (the empty prompt)
    details: object  # pivots (ddim) or the NullTextInversion


def invert_image(model: StableDiffusion, image: torch.Tensor, prompt: str, sampling: SamplingConfig = SamplingConfig(),
                 method: str = "null-text", inversion_guidance: float = 1.0, batch: int = 1,
                 null_config: NullTextConfig | None = None, progress: bool = False) -> Inversion:
    """Encode ``image`` [1, 3, H, W] in [0, 1] (posterior mean, docs/methods.md §0.4) and invert it on the DDIM grid
    of ``sampling`` (which must be ddim with eta 0). ``batch``: the editing batch the null-text advance step uses."""
    if sampling.scheduler != "ddim" or sampling.eta != 0:
        raise ValueError(f"real-image editing inverts with deterministic DDIM; use scheduler 'ddim' with eta 0 "
                         f"(got {sampling.scheduler!r}, eta {sampling.eta})")
    if sampling.spacing not in (None, "leading") or sampling.karras or sampling.rescale_zero_snr:
        raise ValueError("real-image editing inverts on SD's DDIM grid (leading spacing, standard betas); drop "
                         "--spacing, --karras and --rescale-zero-snr")
    check_image_size(image.shape[-2], image.shape[-1], model.config.vae.downsample_factor)
    latents = encode_images(model, image)
    sampler = inversion_sampler(model, sampling.steps)
    if method == "ddim":
        pivots = ddim_invert(model, latents, prompt, sampler, inversion_guidance, progress=progress)
        return Inversion(method, pivots[-1], None, pivots)
    if method == "null-text":
        null_config = null_config or NullTextConfig(guidance=sampling.guidance)
        result = null_text_inversion(model, latents, prompt, sampler, null_config, inversion_guidance, batch, progress)
        return Inversion(method, result.noise, result.null_embeddings, result)
    raise ValueError(f"inversion method {method!r} is not one of ('ddim', 'null-text')")


def edit_real_image(model: StableDiffusion, image: torch.Tensor, source: str, edits: str | Sequence[str],
                    sampling: SamplingConfig = SamplingConfig(), config: P2PConfig = REAL_IMAGE_CONFIG,
                    method: str = "null-text", inversion_guidance: float = 1.0, negative: str | None = None,
                    progress: bool = False) -> tuple[P2PResult, Inversion]:
    """Invert ``image`` under the source prompt, then edit it; row 0 of the result is the reconstruction.
    The defaults are ``editlab p2p --image``'s: null-text inversion on DDIM 50 steps at guidance 7.5 and the
    null-text notebook's edit settings (``REAL_IMAGE_CONFIG``)."""
    prompts = [source] + ([edits] if isinstance(edits, str) else list(edits))
    f = model.config.vae.downsample_factor
    latent_hw = (image.shape[-2] // f, image.shape[-1] // f)
    build_controller(model, prompts, sampling.steps, latent_hw, config)  # check words and prompts before inverting
    if negative and method == "null-text":
        raise ValueError("null-text inversion learns the unconditional embedding that a negative prompt would "
                         "set; drop --negative or invert with --inversion ddim")
    inverted = invert_image(model, image, source, sampling, method, inversion_guidance, len(prompts), progress=progress)
    result = prompt_to_prompt(model, source, edits, sampling, config, noise=inverted.noise,
                              null_embeddings=inverted.null_embeddings, negative=negative, progress=progress)
    return result, inverted
