"""editlab style: IP-Adapter image prompts and InstantStyle block selection / content subtraction.

With the toy model and no --ip-adapter / --image-encoder, the bundled toy adapter and its encoder (the toy
CLIP's image tower) are used:

    editlab style --style-image green-square.png --prompt "a red circle on a blue background" --out o.png

On SDXL, the paper's own setting (h94/IP-Adapter's files as downloaded; the encoder folders are transformers'
CLIPVisionModelWithProjection, config.json + weights):

    editlab style --weights sdxl.safetensors --ip-adapter sdxl_models/ip-adapter_sdxl.safetensors \
        --image-encoder sdxl_models/image_encoder --preset style --style-image s.png --prompt "a cat" --out o.png

(ip-adapter_sdxl_vit-h takes models/image_encoder, OpenCLIP ViT-H). There the content prompt's embedding is
the model's own bigG pooled text embedding (the space of the bigG encoder), so --text-encoder is not needed
with the bigG adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from controls.ip_adapter import check_image_encoder, generate_with_image_prompt
from ldm.clip_vision import preprocess
from ldm.images import check_output, file_sha256, read_rgb, save_png
from ldm.pipeline import decode_latents
from ldm.tokenizer import Tokenizer

from ..instant_style import (CONTENT_SCALE, STYLE_PRESETS, block_scales, content_embedding, preset_scales,
                             subtract_content)
from ..options import (TOY_CLIP_WEIGHTS, TOY_IP_ADAPTER_WEIGHTS, UserError, add_model_arguments, add_output_arguments,
                       add_sampling_arguments, load_model, run_parameters, sampling_config, toy_default)

NAME = "style"
HELP = "generate with an image prompt (IP-Adapter), optionally InstantStyle's block selection"
log = logging.getLogger(__name__)


def add_arguments(parser):
    add_model_arguments(parser, "an SD 1.5 or SDXL base model")
    parser.add_argument("--ip-adapter", type=Path, default=None,
                        help="ip-adapter_sd15 / ip-adapter_sdxl / ip-adapter_sdxl_vit-h .bin or .safetensors; default "
                             "with the toy model: the bundled toy IP-Adapter (ldm/toy/weights/toy-ip-adapter.safetensors)")
    parser.add_argument("--image-encoder", type=Path, default=None,
                        help="its CLIP image encoder (transformers CLIPVisionModelWithProjection folder or file, or "
                             "open_clip weights): models/image_encoder (ViT-H: sd15, sdxl_vit-h) or "
                             "sdxl_models/image_encoder (ViT-bigG: ip-adapter_sdxl); default with the toy model: the "
                             "toy CLIP's image tower (toy-clip.safetensors)")
    parser.add_argument("--style-image", type=Path, required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--scale", type=float, default=1.0, help="image-branch scale λ (all layers or the preset's)")
    blocks = parser.add_mutually_exclusive_group()
    blocks.add_argument("--preset", choices=sorted(STYLE_PRESETS),
                        help="InstantStyle block selection. SDXL (the paper's): style = up_blocks.0.attentions.1; "
                             "style+layout = + down_blocks.2.attentions.1. SD 1.5 (experimental): style = "
                             "up_blocks.1; style+layout = + down_blocks.2 and mid_block")
    blocks.add_argument("--block", action="append", default=[], metavar="NAME=SCALE",
                        help="scale of one diffusers block, e.g. up_blocks.1=1.0 (repeatable; others get 0)")
    parser.add_argument("--content-prompt", default=None, help="InstantStyle: subtract this content from the style")
    parser.add_argument("--content-scale", type=float, default=CONTENT_SCALE, help="λ_c of the content subtraction")
    parser.add_argument("--text-encoder", type=Path, default=None,
                        help="CLIP text tower with text_projection for --content-prompt (for ViT-H adapters: the "
                             "full 24-layer OpenCLIP ViT-H/14, open_clip or transformers layout; SDXL with the bigG "
                             "adapter: default the model's own bigG)")
    add_sampling_arguments(parser, steps=30, guidance=5.0)
    add_output_arguments(parser)


def parse_blocks(entries: list[str]) -> dict[str, float]:
    blocks = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        try:
            blocks[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--block {entry!r}: expected NAME=SCALE, e.g. up_blocks.1=1.0")
    return blocks


def read_style_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise UserError(f"--style-image {path}: no such image file")
    try:
        return read_rgb(path)
    except ValueError as err:
        raise UserError(f"--style-image {err}") from None


def encoder_name(path: Path) -> str:
    """How a PNG names the image encoder: a file by its name; a folder with its parent, as h94's layouts tell the
    two encoders apart only by it (sdxl_models/image_encoder: ViT-bigG; models/image_encoder: ViT-H)."""
    return "/".join(path.parts[-2:]) if path.is_dir() else path.name


def run(args):
    from weights_convert.clip_vision import load_image_encoder
    from weights_convert.ip_adapter import load_ip_adapter

    blocks = parse_blocks(args.block)
    args.ip_adapter = toy_default(args, args.ip_adapter, TOY_IP_ADAPTER_WEIGHTS, "--ip-adapter")
    args.image_encoder = toy_default(args, args.image_encoder, TOY_CLIP_WEIGHTS, "--image-encoder")
    for path, what in ((args.ip_adapter, "--ip-adapter"), (args.image_encoder, "--image-encoder")):
        if not path.exists():
            raise UserError(f"{what} {path}: not found")
    model = load_model(args)
    cfg = sampling_config(args, model)
    if args.preset:
        scales = preset_scales(model.unet, args.preset, args.scale)
    elif blocks:
        scales = block_scales(model.unet, blocks)
    else:
        scales = args.scale
    params = run_parameters(args, cfg, command=NAME, prompt=args.prompt, negative=args.negative or "",
                            ip_adapter=args.ip_adapter.name, ip_adapter_sha256=file_sha256(args.ip_adapter),
                            image_encoder=encoder_name(args.image_encoder),
                            style_image_sha256=file_sha256(args.style_image)
                            if args.style_image.is_file() else "", scale=args.scale, preset=args.preset or "",
                            blocks=blocks, content_prompt=args.content_prompt or "",
                            content_scale=args.content_scale if args.content_prompt else 0.0)
    check_output(args.out, params, args.force)
    image = read_style_image(args.style_image)

    adapter, report = load_ip_adapter(args.ip_adapter, model.unet)
    log.debug(report.summary())
    encoder, report = load_image_encoder(args.image_encoder)
    log.debug(report.summary())
    try:
        check_image_encoder(adapter, encoder.config.projection_dim, f"--ip-adapter {args.ip_adapter.name}",
                            str(args.image_encoder))
    except ValueError as err:
        raise UserError(str(err)) from None
    encoder = encoder.to(model.device)
    with torch.no_grad():
        embeds = encoder(preprocess(image, encoder.config.image_size).to(model.device))
    if args.content_prompt:
        embeds = subtract_content(embeds, content_of(args, model, encoder.config.projection_dim), args.content_scale)
    latents = generate_with_image_prompt(model, adapter, embeds, [args.prompt], scales, cfg, negative=args.negative)
    save_png(args.out, decode_latents(model, latents)[0], params, force=args.force)
    print(args.out)


def content_of(args, model, width: int) -> torch.Tensor:
    """t_content of --content-prompt: from --text-encoder, or on SDXL the model's own bigG pooled embedding when
    the image encoder shares its width (the bigG adapter)."""
    from weights_convert.clip_vision import load_text_with_projection

    if args.text_encoder is not None:
        text, report = load_text_with_projection(args.text_encoder)
        log.debug(report.summary())
        return content_embedding(text.to(model.device), Tokenizer(pad_token_id=0), args.content_prompt)
    bigg = model.config.text_2 if model.is_sdxl else None
    if bigg is not None and bigg.projection_dim == width:
        return content_embedding(model.text_encoder_2, model.tokenizer_2, args.content_prompt)
    raise UserError("--content-prompt needs --text-encoder: the CLIP text tower with text_projection of the "
                    f"image encoder's model ({width}-wide embeddings; the 24-layer OpenCLIP ViT-H/14 for ViT-H "
                    "adapters; SD 2's text encoder lacks its last layer and the projection)")
