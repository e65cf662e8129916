"""editlab generate: text to image with classifier-free guidance."""

from __future__ import annotations

from pathlib import Path

from ldm.images import check_output, save_png
from ldm.pipeline import decode_latents, text_to_image
from ldm.speed import CudaGraphUNet

from ..options import (add_model_arguments, add_output_arguments, add_sampling_arguments, load_model,
                       run_parameters, sampling_config)
from ..sdxl_options import add_micro_conditioning_arguments, micro_conditioning, sdxl_parameters

NAME = "generate"
HELP = "generate images from a prompt (text to image, classifier-free guidance)"


def add_arguments(parser):
    add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt")
    prompt.add_argument("--prompts", type=Path, metavar="FILE",
                        help="a text file with one prompt a line: FILE-LINE.png for each (# starts a comment)")
    parser.add_argument("--batch", type=int, default=1, help="images to generate from one seed, per prompt")
    add_sampling_arguments(parser)
    add_micro_conditioning_arguments(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the UNet call from a CUDA graph recorded at the first step (GPU only)")
    add_output_arguments(parser)


def output_paths(out: Path, count: int, prompts: int = 1) -> list[list[Path]]:
    """[prompt][image]: FILE.png for one image; FILE-0.png, FILE-1.png, ... for a batch; with several prompts
    FILE-P.png, or FILE-P-0.png, ... (P: the prompt's number, from 1)."""
    stems = [out.stem] if prompts == 1 else [f"{out.stem}-{p + 1}" for p in range(prompts)]
    return [[out.with_name(f"{stem}{out.suffix}")] if count == 1 else
            [out.with_name(f"{stem}-{k}{out.suffix}") for k in range(count)] for stem in stems]


def run(args):
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: give at least 1")
    prompts = getattr(args, "prompt_list", None) or [args.prompt]
    model = load_model(args)
    if args.cuda_graph:
        model.unet = CudaGraphUNet(model.unet)
    cfg = sampling_config(args, model)
    micro = micro_conditioning(args, model)
    params = run_parameters(args, cfg, command=NAME, negative=args.negative or "",
                            **sdxl_parameters(micro, cfg.height, cfg.width, args.negative, model.is_sdxl_refiner))
    if args.prompts is not None:
        params["prompts_file"] = args.prompts.name
    plan = [[(path, {**params, "prompt": prompt, "batch_index": k}) for k, path in enumerate(paths)]
            for prompt, paths in zip(prompts, output_paths(args.out, args.batch, len(prompts)))]
    for outputs in plan:  # every file of every prompt checked before any work
        for path, image_params in outputs:
            check_output(path, image_params, args.force)
    for prompt, outputs in zip(prompts, plan):
        latents = text_to_image(model, [prompt] * args.batch, cfg, negative=args.negative, micro=micro)
        for (path, image_params), image in zip(outputs, decode_latents(model, latents)):
            save_png(path, image, image_params, force=args.force)
            print(path)
