"""editlab sdedit: SDEdit (image to image): noise the input to a strength, then denoise under a prompt."""

from __future__ import annotations

from ldm.images import check_output, file_sha256, save_png
from ldm.pipeline import decode_latents, sdedit

from ..options import (add_model_arguments, add_output_arguments, add_sampling_arguments, load_input_image,
                       load_model, run_parameters, sampling_config)
from ..sdxl_options import add_micro_conditioning_arguments, micro_conditioning, sdxl_parameters

NAME = "sdedit"
HELP = "SDEdit: re-draw an image under a prompt from an intermediate noise level"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="input image; its size is kept unless --width/--height")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--strength", type=float, default=0.8, help="noise level to start from, in (0, 1]")
    add_sampling_arguments(parser)
    add_micro_conditioning_arguments(parser)
    add_output_arguments(parser)


def run(args):
    model = load_model(args)
    image = load_input_image(args, model, args.image)
    args.height, args.width = image.shape[-2], image.shape[-1]
    cfg = sampling_config(args, model)
    micro = micro_conditioning(args, model)
    params = run_parameters(args, cfg, command=NAME, prompt=args.prompt, negative=args.negative or "",
                            **sdxl_parameters(micro, cfg.height, cfg.width, args.negative, model.is_sdxl_refiner),
                            strength=args.strength, image_sha256=file_sha256(args.image))
    check_output(args.out, params, args.force)
    latents = sdedit(model, image, [args.prompt], args.strength, cfg, negative=args.negative, micro=micro)
    print(save_png(args.out, decode_latents(model, latents)[0], params, force=args.force))
