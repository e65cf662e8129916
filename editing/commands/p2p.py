"""editlab p2p: Prompt-to-Prompt editing (Hertz et al., ICLR 2023) of a generated or a real image.

Writes into --out DIR: source.png (the source prompt's image; with --image the reconstruction), edited.png
(edited-1.png, ... for several --edit), attention-source.png and attention-edited.png (per-token
cross-attention maps averaged over the steps); with --maps-per-step also attention-source-step-000.png, ... (the
maps of each denoising step alone, one file per step and prompt: what the lab's step slider shows). Every PNG
carries the run's parameters; files of another run are refused before any work starts, and each file is written
atomically.

Defaults are those of the Python API, read from its configs: the Prompt-to-Prompt notebook's (``P2PConfig``:
cross 0.8, self 0.4, blend threshold 0.3) with DDIM 50 steps and guidance 7.5 (``SamplingConfig``); with --image
the null-text notebook's (``REAL_IMAGE_CONFIG``: self 0.5, self-attention one level higher, blending from 20% of
the steps), so ``editlab p2p --image`` with no options equals ``edit_real_image`` with its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses

from ldm.images import check_output, file_sha256, save_png
from ldm.pipeline import decode_latents, sampler_for

from ..p2p.edit import (MODES, REAL_IMAGE_CONFIG, P2PConfig, edit_real_image, prompt_to_prompt, resolve_map_level,
                        resolve_self_level)

from ..options import (add_model_arguments, add_output_arguments, add_sampling_arguments, load_input_image,
                       load_model, run_parameters, sampling_config)

NAME = "p2p"
HELP = "Prompt-to-Prompt: edit an image by swapping, adding or reweighting words of its prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="source prompt")
    parser.add_argument("--edit", action="append", default=None,
                        help="edited prompt (repeat for several); default: the source prompt itself, for a pure "
                             "--reweight")
    parser.add_argument("--mode", choices=MODES, default=P2PConfig.mode,
                        help="swap: words replaced (same word count); refine: words added or removed")
    parser.add_argument("--reweight", nargs="+", default=[], metavar="WORD=VALUE",
                        help="scale a word's cross-attention in the edited prompt (negative allowed)")
    parser.add_argument("--blend", nargs="+", default=[], metavar="WORD",
                        help="local blend: edit only where these words attend (looked up in every prompt)")
    parser.add_argument("--blend-threshold", type=float, default=P2PConfig.blend_threshold)
    parser.add_argument("--blend-start", type=float, default=None,
                        help=f"first blended step as a fraction (default {P2PConfig.blend_start}; "
                             f"{REAL_IMAGE_CONFIG.blend_start} with --image)")
    parser.add_argument("--cross-replace", nargs="+", default=[], metavar="F | WORD=F",
                        help="fraction of steps with replaced cross-attention: one number and/or per word "
                             f"(default {P2PConfig.cross_replace})")
    parser.add_argument("--self-replace", nargs=2, type=float, default=None, metavar=("A", "B"),
                        help="self-attention replaced for steps in [A·N, B·N) (default "
                             f"{' '.join(map(str, P2PConfig.self_replace))}; "
                             f"{' '.join(map(str, REAL_IMAGE_CONFIG.self_replace))} with --image)")
    parser.add_argument("--self-level", type=int, default=None,
                        help="self-attention replaced at UNet levels >= this (default: the map level, SD's ≤16²; "
                             "one less with --image, SD's ≤32²; SDXL: the map level, its ≤32² at 1024 px)")
    parser.add_argument("--map-level", type=int, default=None,
                        help="UNet level of the stored, blended and shown maps (default: level 2, SD's 16² "
                             "at 512 px, SDXL's 32² at 1024 px)")
    parser.add_argument("--image", default=None, help="real image to invert and edit")
    parser.add_argument("--inversion", choices=["ddim", "null-text"], default="null-text")
    parser.add_argument("--inversion-guidance", type=float, default=1.0, help="guidance while DDIM-inverting")
    parser.add_argument("--tile", type=int, default=96, help="side of each attention map tile in pixels")
    parser.add_argument("--maps-per-step", action="store_true",
                        help="also write each denoising step's own maps: attention-NAME-step-000.png, ...")
    add_sampling_arguments(parser)
    add_output_arguments(parser, suffix="")


def parse_word_values(items: list[str], option: str) -> dict[str, float]:
    values = {}
    for item in items:
        word, sep, value = item.rpartition("=")
        try:
            if not sep or not word:
                raise ValueError
            values[word] = float(value)
        except ValueError:
            raise ValueError(f"{option} {item!r}: expected WORD=NUMBER, e.g. {option} cat=0.5") from None
    return values


def parse_cross_replace(items: list[str], default: float = P2PConfig.cross_replace) -> tuple[float, dict[str, float]]:
    """'0.8' and/or 'WORD=F' entries -> (fraction for every word, per-word fractions); ``default`` if no number."""
    plain = [item for item in items if "=" not in item]
    if len(plain) > 1:
        raise ValueError(f"--cross-replace takes one default fraction, got {plain}; give per-word ones as WORD=F")
    try:
        default = float(plain[0]) if plain else default
    except ValueError:
        raise ValueError(f"--cross-replace {plain[0]!r}: expected a number in [0, 1] or WORD=F") from None
    return default, parse_word_values([item for item in items if "=" in item], "--cross-replace")


def p2p_config(args, model, real: bool):
    """The P2PConfig of the command line: the API's defaults (``REAL_IMAGE_CONFIG`` with --image, else
    ``P2PConfig()``) overridden by the given options, with the map and self-attention levels resolved."""
    base = REAL_IMAGE_CONFIG if real else P2PConfig()
    cross, cross_words = parse_cross_replace(args.cross_replace, base.cross_replace)
    config = dataclasses.replace(
        base, mode=args.mode, cross_replace=cross, cross_replace_words=cross_words,
        self_replace=tuple(args.self_replace) if args.self_replace else base.self_replace,
        reweight=parse_word_values(args.reweight, "--reweight"), blend_words=tuple(args.blend),
        blend_threshold=args.blend_threshold,
        blend_start=args.blend_start if args.blend_start is not None else base.blend_start,
        map_level=args.map_level, self_min_level=args.self_level, store_steps=args.maps_per_step)
    map_level = resolve_map_level(model, config)
    self_level = resolve_self_level(config, map_level, model.unet)
    return dataclasses.replace(config, map_level=map_level, self_min_level=self_level)


def check_cut_words(tokenizer, prompts: list[str], named: set[str]) -> None:
    """Words beyond CLIP's 75 tokens are never seen: a word there that the edit changes (or that an option
    names) would silently not be edited, so it is an error."""
    tails = []
    for prompt in prompts:
        tails.append([word for word, kept in tokenizer.word_positions(prompt) if len(kept) < len(tokenizer.encode(word))])
    for k, tail in enumerate(tails):
        option = "--prompt" if k == 0 else "--edit"
        for word in tail:
            if word.strip(".,;:!?") in named or any(other != tail for other in tails):
                raise ValueError(f"{option}: {word!r} lies beyond the {tokenizer.max_length - 2} tokens CLIP reads, "
                                 "so it cannot be edited; shorten the prompt")


def remove_stale_outputs(folder, keep: set[str]) -> None:
    """With --force: the PNGs an earlier p2p run wrote into the folder that this run does not write (an earlier
    run with more --edit prompts left edited-3.png, ...) are removed, so the folder shows one run."""
    from ldm.images import read_parameters

    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if path.name not in keep and (read_parameters(path) or {}).get("command") == NAME:
            path.unlink()


def run(args):
    from editing.p2p.visualize import attention_grid

    if args.edit is None:
        if not args.reweight:
            raise ValueError("give --edit PROMPT (the edited prompt), or --reweight WORD=VALUE to reweight words of "
                             "--prompt itself")
        args.edit = [args.prompt]
    model = load_model(args)
    named = set(parse_word_values(args.reweight, "--reweight")) | set(args.blend) | \
        set(parse_cross_replace(args.cross_replace)[1])
    check_cut_words(model.tokenizer, [args.prompt] + args.edit, named)
    image = None
    if args.image:
        image = load_input_image(args, model, args.image)
        args.height, args.width = image.shape[-2], image.shape[-1]
    sampling = sampling_config(args, model)
    config = p2p_config(args, model, real=image is not None)
    params = run_parameters(args, sampling, command=NAME, prompt=args.prompt, negative=args.negative or "",
                            edits=args.edit, mode=config.mode,
                            cross_replace=config.cross_replace, cross_replace_words=dict(config.cross_replace_words),
                            self_replace=list(config.self_replace), self_level=config.self_min_level,
                            map_level=config.map_level, reweight=dict(config.reweight), blend=list(config.blend_words),
                            blend_threshold=config.blend_threshold, blend_start=config.blend_start,
                            **({"maps_per_step": True} if args.maps_per_step else {}))
    if image is not None:
        params.update(image_sha256=file_sha256(args.image), inversion=args.inversion,
                      inversion_guidance=args.inversion_guidance)
    prompts = [args.prompt] + args.edit
    names = ["source"] + (["edited"] if len(args.edit) == 1 else [f"edited-{k}" for k in range(1, len(prompts))])
    outputs = []  # (path, kind, row, step or None)
    for row, name in enumerate(names):
        outputs.append((args.out / f"{name}.png", "image", row, None))
        outputs.append((args.out / f"attention-{name}.png", "attention", row, None))
    steps = len(sampler_for(model, sampling)) if args.maps_per_step else 0  # UNet calls: one map each
    outputs += [(args.out / f"attention-{name}-step-{i:03d}.png", "attention", row, i)
                for row, name in enumerate(names) for i in range(steps)]

    def output_params(kind, row, step):
        return {**params, "output": kind, "row": row, **({} if step is None else {"step": step})}

    for path, kind, row, step in outputs:  # refuse another run's files before any work
        check_output(path, output_params(kind, row, step), args.force)
    if args.force:
        remove_stale_outputs(args.out, {path.name for path, *_ in outputs})

    if image is None:
        result = prompt_to_prompt(model, args.prompt, args.edit, sampling, config, negative=args.negative, progress=True)
    else:
        result, _ = edit_real_image(model, image, args.prompt, args.edit, sampling, config, args.inversion,
                                    args.inversion_guidance, negative=args.negative, progress=True)
    images = decode_latents(model, result.latents)
    step_maps = result.controller.store.step_maps(result.map_level) if args.maps_per_step else None
    for path, kind, row, step in outputs:
        maps = result.maps[row] if step is None else step_maps[step, row]
        picture = images[row] if kind == "image" else attention_grid(model.tokenizer, prompts[row], maps,
                                                                     tile=args.tile)
        print(save_png(path, picture, output_params(kind, row, step), force=args.force))
