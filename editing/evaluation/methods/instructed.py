"""Adapters of the instruction-following and the conditioned methods.

- ip2p: InstructPix2Pix (Brooks et al., 2023) with the case's instruction; s_T and s_I are sweepable.
- visii: Visii (Nguyen et al., 2023) learns the instruction from the case's own (source, ground truth) pair,
  then applies it to the source: a case without a ground-truth image cannot run.
- controlnet: ControlNet (Zhang et al., 2023) from noise, under the target prompt, with a hint made from the
  case: ``hint=canny`` the Canny edges of the source image (the output's edges are scored against them),
  ``hint=mask`` on toy-edits the source scene's object mask, white on black (a ControlNet trained on such
  masks is needed); on the toy both score the object read from the output against that mask.
- ip-adapter / instant-style: IP-Adapter (Ye et al., 2023) / InstantStyle (Wang et al., 2024) from noise under
  the target prompt, with the case's source image (``style=source``, the default) or its ground truth
  (``style=target``) as the style image; on the toy model the bundled toy IP-Adapter and toy CLIP image
  encoder unless --ip-adapter / --image-encoder are given. With the source as style image and the target
  prompt the two disagree, so content leakage (the source's content copied against the prompt) shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.pipeline import SamplingConfig, decode_latents

from .base import CannotRun, MethodOutput, image_size, need_prompts


@dataclass(frozen=True)
class IP2PParams:
    steps: int = 20
    text_guidance: float = 7.5  # s_T
    image_guidance: float = 1.5  # s_I
    scheduler: str = "ddim"  # the toy model's tested setting; "euler-a" is the reference sampler


def run_ip2p(resources, case, params: IP2PParams, seed: int) -> MethodOutput:
    from editing.instruct_pix2pix.editor import EditConfig, edit_by_instruction

    if not case.instruction:
        raise CannotRun("the case has no instruction")
    model = resources.ip2p_model()
    image_size(model, case)
    cfg = EditConfig(text_guidance=params.text_guidance, image_guidance=params.image_guidance, steps=params.steps,
                     scheduler=params.scheduler, seed=seed)
    latents = edit_by_instruction(model, case.image[None].to(model.device), [case.instruction], cfg, progress=False)
    return MethodOutput(decode_latents(model, latents)[0].cpu())


@dataclass(frozen=True)
class VisiiParams:
    train_steps: int = 100
    lr: float = 1e-3
    steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    init: str = "make it look like this"


def run_visii(resources, case, params: VisiiParams, seed: int) -> MethodOutput:
    from editing.instruct_pix2pix.editor import EditConfig, apply_instruction
    from inversion.visii import train_visii, visii_training

    if case.target is None:
        raise CannotRun("Visii learns from a before/after pair; the case has no ground-truth image")
    model, clip = resources.ip2p_model(), resources.clip_model()
    image_size(model, case)
    before, after = case.image[None].to(model.device), case.target[None].to(model.device)
    result = train_visii(model, clip, before, after, params.init,
                         train=visii_training(params.train_steps, params.lr, seed), progress=False)
    cfg = EditConfig(steps=params.steps, text_guidance=params.text_guidance, image_guidance=params.image_guidance,
                     scheduler="ddim", seed=seed)
    latents = apply_instruction(model, before, result.instruction, cfg, progress=False)
    return MethodOutput(decode_latents(model, latents)[0].cpu())


@dataclass(frozen=True)
class ControlNetParams:
    steps: int = 20
    guidance: float = 7.5
    scale: float = 1.0  # conditioning scale
    hint: str = "canny"  # "canny": the source's edges; "mask": the toy source's object mask
    canny_low: float = 100.0
    canny_high: float = 200.0


HINTS = ("canny", "mask")


def run_controlnet(resources, case, params: ControlNetParams, seed: int) -> MethodOutput:
    from controls.canny import CannyConfig, canny
    from controls.guidance import Control, controlnet_to_image
    from controls.hints import to_hint

    if params.hint not in HINTS:
        raise ValueError(f"controlnet.hint={params.hint!r}: choose from {', '.join(HINTS)}")
    need_prompts(case)
    if params.hint == "mask" and case.source_object_mask is None:
        raise CannotRun("a mask hint needs the source's object mask, which only toy-edits cases have")
    net = resources.controlnet_net()
    model = resources.model()
    height, width = image_size(model, case)
    detector = CannyConfig(params.canny_low, params.canny_high)
    edges = canny(case.image, detector) if params.hint == "canny" else None  # [H, W] bool
    hint_map = edges if edges is not None else case.source_object_mask
    hint = to_hint(hint_map[None], height, width).to(model.device)
    cfg = SamplingConfig(steps=params.steps, guidance=params.guidance, scheduler="ddim", seed=seed,
                         height=height, width=width)
    latents = controlnet_to_image(model, [Control(net, hint, params.scale)], [case.target_prompt], cfg,
                                  progress=False)
    return MethodOutput(decode_latents(model, latents)[0].cpu(), hint_edges=edges, canny_config=detector,
                        hint_mask=case.source_object_mask if edges is None else None)


@dataclass(frozen=True)
class StyleParams:
    steps: int = 20
    guidance: float = 7.5
    scale: float = 1.0  # λ of the image branch (every layer, or the InstantStyle preset's)
    preset: str = "style"  # instant-style only
    style: str = "source"  # the style image: the case's "source" image or its ground-truth "target"


def run_style(resources, case, params: StyleParams, seed: int, instant: bool) -> MethodOutput:
    from editing.instant_style import preset_scales
    from controls.ip_adapter import generate_with_image_prompt
    from ldm.clip_vision import preprocess
    from ldm.images import to_pil

    if params.style not in ("source", "target"):
        raise ValueError(f"style={params.style!r}: choose source or target")
    need_prompts(case)
    if params.style == "target" and case.target is None:
        raise CannotRun("style=target needs the case's ground-truth image; the case has none")
    adapter, encoder = resources.adapter()
    model = resources.model()
    height, width = image_size(model, case)
    style = case.image if params.style == "source" else case.target
    with torch.no_grad():
        embeds = encoder(preprocess(to_pil(style), encoder.config.image_size).to(model.device))
    scales = preset_scales(model.unet, params.preset, params.scale) if instant else params.scale
    cfg = SamplingConfig(steps=params.steps, guidance=params.guidance, scheduler="ddim", seed=seed,
                         height=height, width=width)
    latents = generate_with_image_prompt(model, adapter, embeds, [case.target_prompt], scales, cfg, progress=False)
    return MethodOutput(decode_latents(model, latents)[0].cpu(), style_image=style)
