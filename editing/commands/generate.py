"""editlab generate: text to image with classifier-free guidance."""

from __future__ import annotations

from ldm.images import check_output, save_png
from ldm.pipeline import decode_latents, text_to_image
from ldm.speed import CudaGraphUNet

from ..options import (add_model_arguments, add_output_arguments, add_sampling_arguments, load_model,
                       run_parameters, sampling_config)

NAME = "generate"
HELP = "generate images from a prompt (text to image, classifier-free guidance)"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--batch", type=int, default=1, help="images to generate from one seed")
    add_sampling_arguments(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the UNet call from a CUDA graph recorded at the first step (GPU only)")
    add_output_arguments(parser)


def output_paths(out, count: int):
    """FILE.png for one image; FILE-0.png, FILE-1.png, ... for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]


def run(args):
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: give at least 1")
    model = load_model(args)
    if args.cuda_graph:
        model.unet = CudaGraphUNet(model.unet)
    cfg = sampling_config(args, model)
    params = run_parameters(args, cfg, command=NAME, prompt=args.prompt, negative=args.negative or "")
    outputs = [(path, {**params, "batch_index": k}) for k, path in enumerate(output_paths(args.out, args.batch))]
    for path, image_params in outputs:
        check_output(path, image_params, args.force)
    images = decode_latents(model, text_to_image(model, [args.prompt] * args.batch, cfg, negative=args.negative))
    for (path, image_params), image in zip(outputs, images):
        save_png(path, image, image_params, force=args.force)
        print(path)
