"""editlab textual-inversion: learn a new word for a concept from a few images (Gal et al., ICLR 2023;
docs/methods.md §11).

    editlab textual-inversion --weights sd15.safetensors --images cat_toy/ --token "<cat-toy>" \\
        --init-word toy --out cat-toy.safetensors

OUT is diffusers' learned_embeds format ({token: [d] or [k, d]}): diffusers' ``load_textual_inversion``
reads it, and so does every editlab command that reads a prompt (``--embedding OUT``). --template gives the
captions (default: the paper's "a photo of a {}" and nine more; on the toy model, toy captions such as
"a red {} on a blue background"). OUT.ckpt.pt holds the
resumable training state (--resume continues an interrupted run exactly).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ldm.files import file_sha256

from ..instruct_pix2pix.sizing import open_rgb, to_tensor
from ..options import add_model_arguments, load_model, native_size, weights_path
from ..training_cli import recorded_options, start_checks

NAME = "textual-inversion"
HELP = "textual inversion: learn a new token's embedding from a few images of a concept"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_arguments(parser):
    add_model_arguments(parser, "a text-to-image model", prompts=False)
    parser.add_argument("--images", type=Path, required=True, help="folder with 3-5 images of the concept")
    parser.add_argument("--token", required=True, help='the new placeholder, e.g. "<cat-toy>"')
    parser.add_argument("--init-word", required=True, help="a single-token word to start from, e.g. toy")
    parser.add_argument("--vectors", type=int, default=1, help="embedding vectors for the token (k)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3, help="constant learning rate (original: 5e-3 base)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", action="append", default=None, metavar="TEXT",
                        help='caption template with {} for the token, e.g. "a red {} on a blue background" '
                             '(repeatable; default: the paper\'s "a photo of a {}" and nine more)')
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.pt")
    parser.add_argument("--out", type=Path, required=True, help="output learned_embeds .safetensors file")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file, or start over an interrupted run's checkpoint")


def load_images(folder: Path, size: int) -> torch.Tensor:
    """Every image of ``folder`` (sorted by name), centre-cropped to a square of ``size`` -> [N, 3, size, size]."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: holds no image ({', '.join(IMAGE_SUFFIXES)}); put 3-5 pictures of the concept there")
    return torch.cat([to_tensor(ImageOps.fit(open_rgb(p), (size, size), Image.LANCZOS)) for p in paths])


def run(args):
    from inversion.embedding_optimiser import EmbeddingConfig
    from inversion.textual_inversion import TEMPLATES, save_learned_embeds, train_textual_inversion

    if args.out.suffix != ".safetensors":
        raise ValueError(f"{args.out}: the output must be a .safetensors file")
    if args.out.exists() and not (args.force or args.resume):
        raise FileExistsError(f"{args.out} exists; choose another --out, or pass --resume or --force")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype}: textual inversion learns in fp32; leave --dtype at fp32")
    checkpoint = args.out.with_suffix(".ckpt.pt")
    start_checks(checkpoint, args)
    model = load_model(args)
    images = load_images(args.images, args.size or native_size(model))
    cfg = EmbeddingConfig(steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                          checkpoint_every=max(1, min(500, args.steps // 4)))
    image_files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    options = recorded_options(args, ["token", "init_word", "vectors", "steps", "lr", "seed", "template"], 1,
                               weights_sha256=file_sha256(weights_path(args)), size=images.shape[-1],
                               images={p.name: file_sha256(p) for p in image_files})
    result = train_textual_inversion(model, images, args.token, args.init_word, args.vectors, cfg,
                                     checkpoint=checkpoint, resume=args.resume, options=options, force=args.force,
                                     templates=tuple(args.template or TEMPLATES))
    save_learned_embeds(args.out, args.token, result.best)
    print(args.out)
