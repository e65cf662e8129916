"""editlab ip2p: InstructPix2Pix, edit an image by a written instruction (text and image guidance).

    editlab ip2p --weights ip2p.safetensors --image in.png --instruction "make it snowy" --out out.png
    editlab ip2p ... --grid-text 5,7.5,10 --grid-image 1,1.5,2 --out grid.png   (grid.png + one PNG per cell)

Every PNG records its parameters (instruction, both scales, sampler, seed, sizes, weights and input hashes).
"""

from __future__ import annotations

from pathlib import Path

from controls.image_condition import check_ip2p_model
from ldm.images import file_sha256, save_png, to_pil
from ldm.pipeline import decode_latents
from ldm.schedulers import resolve_sampler

from ..instruct_pix2pix.editor import EditConfig, edit_by_instruction, load_instruction_embedding
from ..instruct_pix2pix.grid import format_scale, labelled_grid, parse_scales
from ..instruct_pix2pix.sizing import open_rgb, prepare_image, to_tensor
from ..options import (TOY_IP2P_WEIGHTS, UserError, add_model_arguments, add_output_arguments, add_sampler_arguments,
                       load_model, native_size, run_settings, weights_path, weights_sha256)

NAME = "ip2p"
HELP = "InstructPix2Pix: edit an image by following a written instruction"


def add_arguments(parser):
    """Defaults: the Python API's (``EditConfig``)."""
    defaults = EditConfig()
    add_model_arguments(parser, "an InstructPix2Pix model (8-channel UNet)", TOY_IP2P_WEIGHTS, needs="editor")
    parser.add_argument("--image", type=Path, required=True, help="input image")
    parser.add_argument("--instruction", default=None, help='edit instruction, e.g. "make it snowy"')
    parser.add_argument("--instruction-embedding", type=Path, default=None,
                        help="safetensors file with a learned [77, width] instruction (e.g. from Visii), used "
                             "instead of --instruction")
    parser.add_argument("--text-guidance", type=float, default=defaults.text_guidance,
                        help="s_T: how strongly to follow the instruction")
    parser.add_argument("--image-guidance", type=float, default=defaults.image_guidance,
                        help="s_I: how closely to keep the input image (values below 1 are honoured)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    add_sampler_arguments(parser, defaults.scheduler, extra_spacings=("log-linear",))  # euler-a: log-linear (edit_cli.py)
    parser.add_argument("--eta", type=float, default=defaults.eta, help="DDIM eta (ddim only)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resolution", type=int, default=None,
                        help="long side of the edit (default: the model's native size, 512 for SD)")
    parser.add_argument("--keep-size", action="store_true",
                        help="keep the input size (floored to the model's size multiple) instead of resizing")
    parser.add_argument("--grid-text", default=None, help="grid mode: comma-separated text scales, e.g. 5,7.5,10")
    parser.add_argument("--grid-image", default=None, help="grid mode: comma-separated image scales, e.g. 1,1.5,2")
    add_output_arguments(parser)


def _instruction(args):
    """(instruction, embedding, what the PNG records about them)."""
    if (args.instruction is None) == (args.instruction_embedding is None):
        raise ValueError("give --instruction TEXT or --instruction-embedding FILE (exactly one)")
    if args.instruction is not None:
        return [args.instruction], None, {"instruction": args.instruction}
    embedding = load_instruction_embedding(args.instruction_embedding)
    return None, embedding, {"instruction_embedding": args.instruction_embedding.name,
                             "instruction_embedding_sha256": file_sha256(args.instruction_embedding)}


def cell_path(out: Path, text_scale: float, image_scale: float) -> Path:
    """grid.png -> grid-t7.5-i1.5.png"""
    return out.with_name(f"{out.stem}-t{format_scale(text_scale)}-i{format_scale(image_scale)}{out.suffix}")


def run(args):
    if args.keep_size and args.resolution is not None:
        raise ValueError("--keep-size and --resolution contradict each other; give one")
    grid = args.grid_text is not None or args.grid_image is not None
    text_scales = parse_scales(args.grid_text, "--grid-text") if args.grid_text else [args.text_guidance]
    image_scales = parse_scales(args.grid_image, "--grid-image") if args.grid_image else [args.image_guidance]
    scheduler, karras = resolve_sampler(args.scheduler)
    if args.rescale_zero_snr or args.guidance_rescale:
        raise UserError("InstructPix2Pix's three-way guidance samples SD's betas without guidance rescale; drop "
                        "--rescale-zero-snr and --guidance-rescale")
    karras = True if (karras or args.karras) else None
    instructions, embedding, recorded = _instruction(args)
    model = load_model(args)
    check_ip2p_model(model)
    source = open_rgb(args.image)
    resolution = args.resolution or native_size(model)
    image = prepare_image(source, model.config, resolution, args.keep_size)
    base = dict(command=NAME, weights=weights_path(args).name, weights_sha256=weights_sha256(weights_path(args)), **run_settings(args),
                dtype=args.dtype, image=args.image.name, image_sha256=file_sha256(args.image),
                sizing="keep-size" if args.keep_size else f"edit_cli resolution {resolution}", scheduler=scheduler,
                spacing=args.spacing or ("log-linear" if scheduler == "euler-a" else "default"), karras=karras,
                negative=args.negative or "",
                steps=args.steps, eta=args.eta, seed=args.seed, height=image.shape[-2], width=image.shape[-1],
                **recorded)

    cells = []
    for s_image in image_scales:
        row = []
        for s_text in text_scales:
            cfg = EditConfig(text_guidance=s_text, image_guidance=s_image, steps=args.steps, scheduler=scheduler,
                             spacing=args.spacing, karras=karras, eta=args.eta, seed=args.seed)
            latents = edit_by_instruction(model, image, instructions, cfg, instruction_embedding=embedding,
                                          negative=args.negative)
            edited = decode_latents(model, latents)[0]
            params = {**base, "text_guidance": s_text, "image_guidance": s_image}
            path = cell_path(args.out, s_text, s_image) if grid else args.out
            print(save_png(path, edited, params, force=args.force))
            row.append(to_pil(edited))
        cells.append(row)
    if grid:
        picture = labelled_grid(cells, text_scales, image_scales, to_pil(image[0]))
        params = {**base, "grid_text": text_scales, "grid_image": image_scales,
                  "cells": [cell_path(args.out, t, i).name for i in image_scales for t in text_scales]}
        print(save_png(args.out, to_tensor(picture)[0], params, force=args.force))

