"""editlab visii: learn an InstructPix2Pix instruction from one before/after example (Visii, docs/methods.md §10).

    editlab visii --weights ip2p.safetensors --clip clip-vit-l-14.safetensors \\
        --before before.png --after after.png --out visii-run
    editlab visii --before before.png --after after.png --out visii-run     # the toy model and toy CLIP
    editlab ip2p --weights ip2p.safetensors --instruction-embedding visii-run/instruction.safetensors \\
        --image test.png --out edited.png

OUT/instruction.safetensors holds the learned [77, C] hidden states (picked by the smoothed loss);
OUT/losses.csv the loss of every step and its smoothed value (the curve that picked them);
OUT/checkpoint.pt is the resumable training state (--resume continues an interrupted run exactly).
--clip is a local open_clip ViT-L/14 state dict (OpenAI weights: QuickGELU); --clip-config a JSON open_clip
model config for other CLIP shapes. --init-search finds the init text by PEZ (inversion/pez.py) on --after
with --search-clip (default --clip); the text is stored as "init" in the instruction file's metadata (a
--resume run searches again, with the same result on the same device).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from controls.image_condition import check_ip2p_model
from ldm.clip_models import load_clip
from ldm.files import atomic_path, file_sha256

from ..instruct_pix2pix.sizing import open_rgb, to_tensor
from ..options import (TOY_CLIP_WEIGHTS, TOY_IP2P_WEIGHTS, add_model_arguments, load_model, native_size,
                       toy_default, weights_path, weights_sha256)
from ..training_cli import recorded_options, start_checks

NAME = "visii"
HELP = "Visii: learn an InstructPix2Pix instruction from a before/after image pair"


def add_arguments(parser):
    add_model_arguments(parser, "an InstructPix2Pix model (8-channel UNet)", TOY_IP2P_WEIGHTS, needs="editor",
                        prompts=False)
    parser.add_argument("--clip", type=Path, default=None,
                        help="open_clip CLIP ViT-L/14 weights (.safetensors/.pt); default with a toy model: the "
                             "bundled toy CLIP (ldm/toy/weights/toy-clip.safetensors)")
    parser.add_argument("--clip-config", type=Path, default=None,
                        help="JSON open_clip model config (embed_dim, vision_cfg, text_cfg); default ViT-L/14")
    parser.add_argument("--before", type=Path, required=True, help="the example's input image")
    parser.add_argument("--after", type=Path, required=True, help="the example's edited image")
    parser.add_argument("--init", default="make it look like this", help="instruction text to start from")
    parser.add_argument("--init-search", action="store_true",
                        help="find the init text by PEZ hard-prompt search on --after instead (the reference's "
                             "prompt_type: learn); the found text is recorded in the output's metadata")
    parser.add_argument("--search-steps", type=int, default=3000, help="PEZ iterations (reference 3000)")
    parser.add_argument("--search-length", type=int, default=10, help="PEZ prompt tokens (reference 10)")
    parser.add_argument("--search-clip", type=Path, default=None,
                        help="open_clip weights for the PEZ search (the reference: ViT-H-14 laion2b; needs "
                             "--search-clip-config); default: the --clip model")
    parser.add_argument("--search-clip-config", type=Path, default=None,
                        help="JSON open_clip model config of --search-clip; default ViT-L/14")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-weight", type=float, default=None,
                        help="λ_clip, weight of the CLIP direction term of the loss (default: VisiiConfig's, the "
                             "paper's 0.1; 0 turns the term off)")
    parser.add_argument("--clip-gradients", action="store_true",
                        help="clip gradient values to the initial states' maximum (as the reference)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a finished run in OUT, or start over an interrupted one")


def _image(path: Path, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [0, 1]; the aspect is not kept (the reference resizes to 512² too)."""
    from PIL import Image

    return to_tensor(open_rgb(path).resize((size, size), Image.LANCZOS))


def visii_options(args, size: int, clip_path) -> dict:
    """The inputs that change the learned instruction (recorded in the checkpoint, checked on --resume)."""
    files = {"weights": weights_path(args), "before": args.before, "after": args.after, "clip": clip_path,
             "search_clip": args.search_clip}
    return recorded_options(args, ["init", "init_search", "search_steps", "search_length", "steps", "lr", "seed",
                                   "clip_gradients", "clip_weight"], 1, size=size,
                            **{f"{k}_sha256": file_sha256(v) for k, v in files.items() if v is not None})


def write_losses(path: Path, losses: list[float], smoothed: list[float], best_step: int) -> None:
    """step,loss,smoothed,best: one row per step (1-based); best marks the step whose states were kept."""
    with atomic_path(path) as tmp:
        lines = ["step,loss,smoothed,best"] + [f"{k},{loss!r},{mean!r},{int(k == best_step)}"
                                                for k, (loss, mean) in enumerate(zip(losses, smoothed), start=1)]
        tmp.write_text("\n".join(lines) + "\n")


def run(args):
    from inversion.visii import VisiiConfig, save_instruction, train_visii, visii_training

    out = args.out / "instruction.safetensors"
    if out.exists() and not (args.force or args.resume):
        raise FileExistsError(f"{out} exists; choose another --out, or pass --resume or --force")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype}: Visii learns in fp32; leave --dtype at fp32")
    start_checks(args.out / "checkpoint.pt", args)
    if args.clip_config is not None and args.clip is None:
        raise ValueError("--clip-config describes a --clip file; pass --clip too (or neither for the toy CLIP)")
    clip_path = toy_default(args, args.clip, TOY_CLIP_WEIGHTS, "--clip")
    model = load_model(args)
    check_ip2p_model(model)
    searches_with_clip = args.init_search and args.search_clip is None  # PEZ then encodes text with --clip
    clip = load_clip(clip_path, args.clip_config, text_tower=searches_with_clip).to(model.device)
    size = args.size or native_size(model)
    before, after = _image(args.before, size), _image(args.after, size)
    search, search_clip = None, None
    if args.init_search:
        from inversion.pez import PezConfig

        search = PezConfig(length=args.search_length, steps=args.search_steps, seed=args.seed)
        if args.search_clip is not None:
            search_clip = load_clip(args.search_clip, args.search_clip_config, text_tower=True).to(model.device)
    elif args.search_clip is not None:
        raise ValueError("--search-clip is only used with --init-search; add --init-search or drop --search-clip")
    loss_config = VisiiConfig(clip_gradients=args.clip_gradients)
    if args.clip_weight is not None:
        loss_config = dataclasses.replace(loss_config, clip_weight=args.clip_weight)
    train = visii_training(steps=args.steps, lr=args.lr, seed=args.seed,
                           checkpoint_every=max(1, min(100, args.steps // 4)))
    result = train_visii(model, clip, before, after, None if search else args.init,
                         loss_config, train, checkpoint=args.out / "checkpoint.pt",
                         resume=args.resume, init_search=search, search_clip=search_clip,
                         options=visii_options(args, size, clip_path), force=args.force)
    metadata = {"weights": weights_path(args).name, "weights_sha256": weights_sha256(weights_path(args)),
                "threads": str(torch.get_num_threads()),
                "before_sha256": file_sha256(args.before), "after_sha256": file_sha256(args.after),
                "clip": clip_path.name, "clip_sha256": file_sha256(clip_path), "clip_weight": str(loss_config.clip_weight),
                "init": result.init_prompt, "size": str(size), "steps": str(args.steps), "lr": str(args.lr),
                "seed": str(args.seed), "best_step": str(result.run.best_step)}
    if result.search is not None:
        metadata.update({"init_search": "pez", "search_steps": str(args.search_steps),
                         "search_length": str(args.search_length),
                         "search_similarity": f"{result.search.similarity:.6f}",
                         "search_clip": (args.search_clip or clip_path).name})
        print(f"PEZ init prompt: {result.init_prompt!r} (CLIP similarity {result.search.similarity:.4f})",
              file=sys.stderr)
    save_instruction(out, result.instruction, result.eos, metadata)
    write_losses(args.out / "losses.csv", result.run.losses, result.run.smoothed, result.run.best_step)
    print(out)
