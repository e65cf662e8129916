"""editlab controlnet: text to image under one or more ControlNets (Zhang, Rao, Agrawala, ICCV 2023).

    editlab controlnet --weights sd15.safetensors --control canny.safetensors --detect canny --image in.jpg \\
        --prompt "a bird, best quality" --out out.png
    editlab controlnet ... --control canny.safetensors:1.0 --control depth.safetensors:0.5 \\
        --hint edges.png --hint depth.png --prompt "a house" --out out.png
    editlab controlnet ... --guess-mode --prompt "" ...     (no prompt needed; the ramped scales of guess mode)

Hints: ``--hint IMG`` (one for all ControlNets, or one per ControlNet, in [0, 1] as stored: white edges on black)
or ``--detect canny --image IMG`` (the released Canny annotator; at the model's native resolution, or at
--width × --height when given). The PNG records every parameter and the hashes of all inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from controls import CannyConfig, Control, ControlNet, canny, canny_hint, controlnet_to_image, to_hint
from controls.guidance import GUESS_RULES
from ldm.images import check_output, file_sha256, load_image, save_png
from ldm.pipeline import decode_latents

from ..options import (DTYPES, UserError, add_model_arguments, add_output_arguments, add_sampling_arguments,
                       load_model, native_size, run_parameters, sampling_config)

NAME = "controlnet"
HELP = "ControlNet: generate an image that follows a spatial hint (edges, ...) and a prompt"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--control", action="append", required=True, metavar="FILE[:SCALE]",
                        help="editlab ControlNet file (from 'editlab convert') with an optional strength "
                             "(default 1.0); repeat for several ControlNets (their residuals add up)")
    parser.add_argument("--hint", action="append", type=Path, default=None, metavar="IMG",
                        help="hint image in [0, 1] as stored (e.g. an edge map); one, or one per --control")
    parser.add_argument("--detect", choices=["canny"], default=None, help="make the hint from --image")
    parser.add_argument("--image", type=Path, default=None, help="photo for --detect")
    parser.add_argument("--canny-low", type=float, default=100.0, help="Canny low threshold (annotator default)")
    parser.add_argument("--canny-high", type=float, default=200.0, help="Canny high threshold (annotator default)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--guess-mode", action="store_true",
                        help="no control on the unconditional half, scales ramped shallow -> deep")
    parser.add_argument("--guess-rule", choices=GUESS_RULES, default="diffusers",
                        help="guess-mode ramp: logspace(-1, 0, 13) (diffusers) or 0.825^(12-k) (original)")
    add_sampling_arguments(parser, steps=20, guidance=9.0)  # gradio_canny2image.py defaults
    add_output_arguments(parser)


def parse_control(spec: str) -> tuple[Path, float]:
    """"FILE" or "FILE:SCALE" -> (path, scale)."""
    path, _, scale = spec.rpartition(":")
    if path and scale:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def detect_canny(image_path: Path, config: CannyConfig, native: int, height: int | None = None,
                 width: int | None = None, multiple: int = 8) -> torch.Tensor:
    """--detect canny: the hint [1, 3, H, W] in [0, 1] from the photo at ``image_path``; at the model's native
    resolution ``native``, or at ``height`` × ``width`` when both are given (the lab's preview calls this too)."""
    image = load_image(image_path)
    if width and height:  # detect at the output size: resampling would blur 1-pixel edges
        return to_hint(canny(to_hint(image, height, width, multiple), config), height, width, multiple)
    return canny_hint(image, native, config)


def make_hints(args, model, n_controls: int):
    """The hint tensors [1, 3, H, W] in [0, 1], and what the PNG records about them."""
    if (args.hint is None) == (args.detect is None):
        raise UserError("give --hint IMG (one, or one per --control) or --detect canny --image IMG, exactly one")
    if args.detect is not None:
        if args.image is None:
            raise UserError("--detect canny needs --image IMG (the photo to detect edges in)")
        hint = detect_canny(args.image, CannyConfig(args.canny_low, args.canny_high), native_size(model),
                            args.height, args.width, model.config.vae.downsample_factor)
        record = {"detect": "canny", "canny_low": args.canny_low, "canny_high": args.canny_high,
                  "image_sha256": file_sha256(args.image)}
        return [hint] * n_controls, record
    if len(args.hint) not in (1, n_controls):
        raise UserError(f"{len(args.hint)} --hint images for {n_controls} --control files; give one or one each")
    images = [load_image(path) for path in args.hint]
    height, width = (args.height, args.width) if args.width and args.height else images[0].shape[-2:]
    hints = [to_hint(image, height, width, model.config.vae.downsample_factor) for image in images]
    record = {"hint_sha256": [file_sha256(path) for path in args.hint]}
    return hints * (n_controls // len(hints)), record


def run(args):
    model = load_model(args)
    specs = [parse_control(spec) for spec in args.control]
    for path, _ in specs:
        if not path.is_file():
            raise UserError(f"ControlNet file {path} not found; convert one first: editlab convert SRC OUT.safetensors")
    hints, record = make_hints(args, model, len(specs))
    args.height, args.width = hints[0].shape[-2:]
    cfg = sampling_config(args, model)
    params = run_parameters(args, cfg, command=NAME, prompt=args.prompt, negative=args.negative or "",
                            controls=[{"file": p.name, "sha256": file_sha256(p), "scale": s} for p, s in specs],
                            guess_mode=args.guess_mode, guess_rule=args.guess_rule, **record)
    check_output(args.out, params, args.force)
    controls = [Control(ControlNet.load(path, args.device, DTYPES[args.dtype]), hint.to(args.device), scale)
                for (path, scale), hint in zip(specs, hints)]
    latents = controlnet_to_image(model, controls, [args.prompt], cfg, negative=args.negative,
                                  guess_mode=args.guess_mode, guess_rule=args.guess_rule)
    print(save_png(args.out, decode_latents(model, latents)[0], params, force=args.force))
