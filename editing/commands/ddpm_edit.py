"""editlab ddpm-edit: edit a real image by edit-friendly DDPM inversion (optionally combined with P2P)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from inversion.ddpm_noise import DDPMInversionConfig
from ldm.images import file_sha256, load_image, save_png
from ldm.pipeline import decode_latents

from ..ddpm_edit.editor import DDPMEditConfig, DDPMP2PConfig, edit, edit_with_p2p, invert_image, p2p_controller
from ..options import UserError, add_model_arguments, load_model, weights_path

NAME = "ddpm-edit"
HELP = "edit a real image: edit-friendly DDPM inversion under a source prompt, regeneration under a target prompt"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="input image; its size is kept unless --width/--height")
    parser.add_argument("--source-prompt", required=True, help="describes the input image")
    parser.add_argument("--target-prompt", required=True, help="describes the wanted edit")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps on the leading grid (paper: 100)")
    parser.add_argument("--skip", type=int, default=None,
                        help="first steps not regenerated (default 36, or 12 with --p2p); more keeps more of the input")
    parser.add_argument("--source-guidance", type=float, default=3.5, help="CFG scale of the inversion")
    parser.add_argument("--target-guidance", type=float, default=None, help="CFG scale of the edit (default 15, "
                        "or 9 with --p2p)")
    parser.add_argument("--eta", type=float, default=1.0, help="noise scale eta > 0 (1: DDPM)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the auxiliary noise (sample k uses seed + k)")
    parser.add_argument("--samples", type=int, default=1, help="diverse edits, one inversion draw each")
    parser.add_argument("--p2p", action="store_true", help="combine with Prompt-to-Prompt attention control")
    parser.add_argument("--cross-replace", type=float, default=None, help="P2P: fraction of steps with cross-"
                        "attention replaced (default 0.6)")
    parser.add_argument("--self-replace", type=float, default=None, help="P2P: fraction of steps with self-"
                        "attention injected (default 0.2)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="output folder (edit-0.png, edit-1.png, ...)")
    parser.add_argument("--force", action="store_true", help="overwrite outputs of another run")


def _given(value, default):
    return default if value is None else value


def edit_config(args):
    """The edit settings: the paper's defaults of the chosen mode, overridden by the given options."""
    if not args.p2p:
        if args.cross_replace is not None or args.self_replace is not None:
            raise UserError("--cross-replace/--self-replace need --p2p")
        base = DDPMEditConfig()
        return DDPMEditConfig(skip=_given(args.skip, base.skip),
                              target_guidance=_given(args.target_guidance, base.target_guidance))
    base = DDPMP2PConfig()
    return DDPMP2PConfig(skip=_given(args.skip, base.skip),
                         target_guidance=_given(args.target_guidance, base.target_guidance),
                         cross_replace=_given(args.cross_replace, base.cross_replace),
                         self_replace=_given(args.self_replace, base.self_replace))


def run(args):
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: give at least 1")
    if args.skip is not None and not 0 <= args.skip < args.steps:
        raise UserError(f"--skip {args.skip} must lie in [0, {args.steps - 1}] for {args.steps} steps")
    inversion_cfg = DDPMInversionConfig(steps=args.steps, eta=args.eta, source_guidance=args.source_guidance)
    cfg = edit_config(args)
    model = load_model(args)
    size = (args.width, args.height) if args.width and args.height else None
    image = load_image(args.image, size)
    if args.p2p:  # check the prompts (word alignment) before the inversion runs
        factor = model.config.vae.downsample_factor
        p2p_controller(model, args.source_prompt, args.target_prompt, args.steps,
                       (image.shape[-2] // factor, image.shape[-1] // factor), cfg)
    inversion = invert_image(model, image, args.source_prompt, inversion_cfg, args.seed, args.samples, progress=True)
    if args.p2p:
        rows = [edit_with_p2p(model, inversion.row(k), args.source_prompt, args.target_prompt, cfg, progress=True)[1:]
                for k in range(args.samples)]
        latents = torch.cat(rows)  # the target rows, [samples, C, h, w]
    else:
        latents = edit(model, inversion, args.target_prompt, cfg, progress=True)
    images = decode_latents(model, latents)
    path = weights_path(args)
    params = {"command": NAME, "weights": path.name, "weights_sha256": file_sha256(path),
              "image_sha256": file_sha256(args.image), "source_prompt": args.source_prompt,
              "target_prompt": args.target_prompt, "steps": args.steps, "eta": args.eta,
              "source_guidance": args.source_guidance, "seed": args.seed, "dtype": args.dtype,
              "height": image.shape[-2], "width": image.shape[-1], "p2p": args.p2p, **asdict(cfg)}
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.samples):
        print(save_png(args.out / f"edit-{k}.png", images[k], {**params, "sample": k, "aux_seed": args.seed + k},
                       force=args.force))
