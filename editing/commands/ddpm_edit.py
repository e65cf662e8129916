"""editlab ddpm-edit: edit a real image by edit-friendly DDPM inversion (optionally combined with P2P).

SDXL weights work as SD 1.x/2.x ones: both prompts are read by both text encoders, and every step also gets the
pooled embedding and the size/crop numbers (``--original-size``, ``--crop-top-left``, ``--target-size``;
default: the image size, crop (0, 0)), the same for the inversion and the edit."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from inversion.ddpm_noise import DDPMInversionConfig
from ldm.images import check_output, file_sha256, save_png
from ldm.pipeline import decode_latents

from ..ddpm_edit.editor import (DDPMEditConfig, DDPMP2PConfig, ddpm_invert_image, edit_inversion, edit_with_p2p,
                                p2p_controller)
from ..options import (UserError, add_model_arguments, load_input_image, load_model, run_settings, weights_path,
                       weights_sha256)
from ..sdxl_options import add_micro_conditioning_arguments, micro_conditioning, sdxl_parameters

NAME = "ddpm-edit"
HELP = "edit a real image: edit-friendly DDPM inversion under a source prompt, regeneration under a target prompt"


def add_arguments(parser):
    """Defaults: the Python API's (``DDPMInversionConfig``, ``DDPMEditConfig``, ``DDPMP2PConfig``)."""
    inversion, plain, with_p2p = DDPMInversionConfig(), DDPMEditConfig(), DDPMP2PConfig()
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="input image; its size is kept unless --width/--height")
    parser.add_argument("--source-prompt", required=True, help="describes the input image")
    parser.add_argument("--target-prompt", required=True, help="describes the wanted edit")
    parser.add_argument("--steps", type=int, default=inversion.steps, help="DDPM steps on the leading grid")
    parser.add_argument("--skip", type=int, default=None,
                        help=f"first steps not regenerated; more keeps more of the input (default: the paper's "
                             f"{plain.skip} of 100 steps, or {with_p2p.skip} of 100 with --p2p, scaled to --steps)")
    parser.add_argument("--source-guidance", type=float, default=inversion.source_guidance,
                        help="CFG scale of the inversion")
    parser.add_argument("--target-guidance", type=float, default=None, help="CFG scale of the edit (default "
                        f"{plain.target_guidance:g}, or {with_p2p.target_guidance:g} with --p2p)")
    parser.add_argument("--eta", type=float, default=inversion.eta, help="noise scale eta > 0 (1: DDPM)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the auxiliary noise (sample k uses seed + k)")
    parser.add_argument("--samples", type=int, default=1, help="diverse edits, one inversion draw each")
    parser.add_argument("--p2p", action="store_true", help="combine with Prompt-to-Prompt attention control")
    parser.add_argument("--cross-replace", type=float, default=None, help="P2P: fraction of steps with cross-"
                        f"attention replaced (default {with_p2p.cross_replace})")
    parser.add_argument("--self-replace", type=float, default=None, help="P2P: fraction of steps with self-"
                        f"attention injected (default {with_p2p.self_replace})")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    add_micro_conditioning_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (edit-0.png, edit-1.png, ...)")
    parser.add_argument("--force", action="store_true", help="overwrite outputs of another run")
    parser.set_defaults(out_is_folder=True)


def _given(value, default):
    return default if value is None else value


def scaled_skip(paper_skip: int, steps: int) -> int:
    """The paper's skip is given for 100 steps (36, or 12 with P2P): the same fraction of ``steps``."""
    return min(steps - 1, round(paper_skip * steps / 100))


def edit_config(args):
    """The edit settings: the paper's defaults of the chosen mode, overridden by the given options."""
    if not args.p2p:
        if args.cross_replace is not None or args.self_replace is not None:
            raise UserError("--cross-replace/--self-replace need --p2p")
        base = DDPMEditConfig()
        return DDPMEditConfig(skip=_given(args.skip, scaled_skip(base.skip, args.steps)),
                              target_guidance=_given(args.target_guidance, base.target_guidance))
    base = DDPMP2PConfig()
    return DDPMP2PConfig(skip=_given(args.skip, scaled_skip(base.skip, args.steps)),
                         target_guidance=_given(args.target_guidance, base.target_guidance),
                         cross_replace=_given(args.cross_replace, base.cross_replace),
                         self_replace=_given(args.self_replace, base.self_replace))


def run(args):
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: give at least 1")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1")
    if args.skip is not None and not 0 <= args.skip < args.steps:
        raise UserError(f"--skip {args.skip} must lie in [0, {args.steps - 1}] for {args.steps} steps")
    inversion_cfg = DDPMInversionConfig(steps=args.steps, eta=args.eta, source_guidance=args.source_guidance)
    cfg = edit_config(args)
    model = load_model(args)
    micro = micro_conditioning(args, model)  # SDXL: the same size/crop numbers invert and edit
    image = load_input_image(args, model, args.image)
    if args.p2p:  # check the prompts (word alignment) before the inversion runs
        factor = model.config.vae.downsample_factor
        p2p_controller(model, args.source_prompt, args.target_prompt, args.steps,
                       (image.shape[-2] // factor, image.shape[-1] // factor), cfg)
    path = weights_path(args)
    params = {"command": NAME, "weights": path.name, "weights_sha256": weights_sha256(path), **run_settings(args),
              "image_sha256": file_sha256(args.image), "source_prompt": args.source_prompt,
              "target_prompt": args.target_prompt, "steps": args.steps, "eta": args.eta,
              "source_guidance": args.source_guidance, "seed": args.seed, "dtype": args.dtype,
              "height": image.shape[-2], "width": image.shape[-1], "p2p": args.p2p, **asdict(cfg),
              **sdxl_parameters(micro, image.shape[-2], image.shape[-1], None)}
    outputs = [(args.out / f"edit-{k}.png", {**params, "sample": k, "aux_seed": args.seed + k})
               for k in range(args.samples)]
    for out, image_params in outputs:  # another run's files refused before the inversion
        check_output(out, image_params, args.force)
    inversion = ddpm_invert_image(model, image, args.source_prompt, inversion_cfg, args.seed, args.samples,
                                  progress=True, micro=micro)
    if args.p2p:
        rows = [edit_with_p2p(model, inversion.row(k), args.source_prompt, args.target_prompt, cfg, progress=True)[1:]
                for k in range(args.samples)]
        latents = torch.cat(rows)  # the target rows, [samples, C, h, w]
    else:
        latents = edit_inversion(model, inversion, args.target_prompt, cfg, progress=True)
    images = decode_latents(model, latents)
    for (out, image_params), picture in zip(outputs, images):
        print(save_png(out, picture, image_params, force=args.force))
