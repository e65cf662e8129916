"""editlab visii: learn an InstructPix2Pix instruction from one before/after example (Visii, METHODS.md §10).

    editlab visii --weights ip2p.safetensors --clip clip-vit-l-14.safetensors \\
        --before before.png --after after.png --out visii-run
    editlab ip2p --weights ip2p.safetensors --instruction-embedding visii-run/instruction.safetensors \\
        --image test.png --out edited.png

OUT/instruction.safetensors holds the learned [77, C] hidden states (picked by the smoothed loss);
OUT/checkpoint.pt is the resumable training state (--resume continues an interrupted run exactly).
--clip is a local open_clip ViT-L/14 state dict (OpenAI weights: QuickGELU); --clip-config a JSON open_clip
model config for other CLIP shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.images import file_sha256

from ..instruct_pix2pix import check_ip2p_model
from ..ip2p_sizing import open_rgb, to_tensor
from ..options import add_model_arguments, load_model, native_size, weights_path

NAME = "visii"
HELP = "Visii: learn an InstructPix2Pix instruction from a before/after image pair"


def add_arguments(parser):
    add_model_arguments(parser, "an InstructPix2Pix model (8-channel UNet)")
    parser.add_argument("--clip", type=Path, required=True, help="open_clip CLIP ViT-L/14 weights (.safetensors/.pt)")
    parser.add_argument("--clip-config", type=Path, default=None,
                        help="JSON open_clip model config (embed_dim, vision_cfg, text_cfg); default ViT-L/14")
    parser.add_argument("--before", type=Path, required=True, help="the example's input image")
    parser.add_argument("--after", type=Path, required=True, help="the example's edited image")
    parser.add_argument("--init", default="make it look like this", help="instruction text to start from")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-gradients", action="store_true",
                        help="clip gradient values to the initial states' maximum (as the reference)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--force", action="store_true", help="overwrite a finished run in OUT")


def load_clip(path: Path, config: Path | None):
    """An open_clip CLIP model with the weights of ``path`` (safetensors, or a .pt read with weights_only)."""
    import open_clip

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CLIP weights file")
    if config is not None:
        model = open_clip.model.CLIP(**json.loads(config.read_text()))
    else:
        model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    needed = [k for k in missing if k.startswith("visual.") or k == "text_projection"]
    if needed:
        raise ValueError(f"{path}: not an open_clip CLIP state dict fitting the config (missing {needed[:3]}); "
                         "pass CLIP ViT-L/14 weights or the matching --clip-config")
    return model.eval().requires_grad_(False)


def _image(path: Path, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [0, 1]; the aspect is not kept (the reference resizes to 512² too)."""
    from PIL import Image

    return to_tensor(open_rgb(path).resize((size, size), Image.LANCZOS))


def run(args):
    from inversion.visii import VisiiConfig, save_instruction, train_visii, visii_training

    out = args.out / "instruction.safetensors"
    if out.exists() and not (args.force or args.resume):
        raise FileExistsError(f"{out} exists; choose another --out, or pass --resume or --force")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype}: Visii learns in fp32; leave --dtype at fp32")
    model = load_model(args)
    check_ip2p_model(model)
    clip = load_clip(args.clip, args.clip_config).to(model.device)
    size = args.size or native_size(model)
    before, after = _image(args.before, size), _image(args.after, size)
    train = visii_training(steps=args.steps, lr=args.lr, seed=args.seed,
                           checkpoint_every=max(1, min(100, args.steps // 4)))
    result = train_visii(model, clip, before, after, args.init, VisiiConfig(clip_gradients=args.clip_gradients),
                         train, checkpoint=args.out / "checkpoint.pt", resume=args.resume)
    metadata = {"weights": weights_path(args).name, "weights_sha256": file_sha256(weights_path(args)),
                "before_sha256": file_sha256(args.before), "after_sha256": file_sha256(args.after),
                "init": args.init, "size": str(size), "steps": str(args.steps), "lr": str(args.lr),
                "seed": str(args.seed), "best_step": str(result.run.best_step)}
    save_instruction(out, result.instruction, result.eos, metadata)
    print(out)
