"""``check_before_work``: every check the command line makes on a command's options before the command runs
(and so before any model is loaded), using only what the options and the files' headers say."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from .checks import (check_device, check_memory, check_output_path, check_placeholders, check_sizes, check_weights,
                     native_side)
from .errors import UserError

PROMPT_OPTIONS = ("prompt", "edit", "negative", "source_prompt", "target_prompt", "instruction", "content_prompt")


def prompts_of(args) -> dict[str, str]:
    """{"--option": prompt} of every prompt the command line holds (repeated options numbered)."""
    found = {}
    for name in PROMPT_OPTIONS:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        for k, text in enumerate(v for v in values if isinstance(v, str)):
            found[f"--{name.replace('_', '-')}" + (f" #{k + 1}" if len(values) > 1 else "")] = text
    for k, text in enumerate(getattr(args, "prompt_list", None) or []):
        found[f"--prompts line {k + 1}"] = text
    return found


def read_prompt_file(args) -> None:
    """generate --prompts FILE: one prompt a line (blank lines and lines starting with # skipped)."""
    path = getattr(args, "prompts", None)
    if path is None:
        return
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file (one prompt a line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not a UTF-8 text file (one prompt a line)") from None
    args.prompt_list = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not args.prompt_list:
        raise UserError(f"--prompts {path}: holds no prompt (one prompt a line; # starts a comment)")


def embedding_tokens(args) -> set[str]:
    """The tokens of the --embedding files (each read and checked)."""
    from .options import embedding_token

    tokens = set()
    for path in getattr(args, "embedding", None) or []:
        if not path.is_file():
            raise UserError(f"--embedding {path}: no such file")
        token = embedding_token(path)
        if token in tokens:
            raise UserError(f"--embedding {path}: token {token} is defined by two files; give each once")
        tokens.add(token)
    return tokens


def native_image_size(args) -> tuple[int, int] | None:
    """(width, height) of the command's --image (read from its header), which image-to-image commands keep."""
    path = getattr(args, "image", None)
    if path is None or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None  # reported by the command, which reads the image


def check_learning_rate(lr: float | None) -> None:
    """Every optimiser here (Adam/AdamW on weights or embeddings) steps by about lr per step, whatever the
    gradient's scale, so an lr above 1 throws the weights far outside anything the model was trained with (and
    one near the float32 limit overflows inside the optimiser)."""
    if lr is None:
        return
    if not math.isfinite(lr) or not 0 < lr <= 1:
        raise UserError(f"--lr {lr}: give a learning rate in (0, 1]; these methods use 1e-5 to 1e-2 "
                        "(see the command's --help for its default)")


def check_before_work(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: give at least 1")
        torch.set_num_threads(threads)
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    check_sizes(args)
    check_learning_rate(getattr(args, "lr", None))
    read_prompt_file(args)
    check_placeholders(prompts_of(args), embedding_tokens(args))
    out = getattr(args, "out", None)
    if out is not None:
        folder = getattr(args, "out_is_folder", None)
        check_output_path(out, out.suffix == "" if folder is None else folder)
    config = None
    if hasattr(args, "model_needs"):
        from .options import weights_path

        config = check_weights(weights_path(args), args.model_needs, args.command)
    if config is not None:
        native = native_image_size(args) or (native_side(config),) * 2
        height = getattr(args, "height", None) or getattr(args, "size", None) or native[1]
        width = getattr(args, "width", None) or getattr(args, "size", None) or native[0]
        # images in one sampling loop: the command's own count where it differs (make-pairs), else the batch,
        # or the samples a command renders together (ddpm-edit)
        rows = getattr(args, "images_per_loop", None)
        batch = rows(args) if rows else max(getattr(args, "batch", None) or 1, getattr(args, "samples", None) or 1)
        check_memory(config, height, width, batch, args.device)
