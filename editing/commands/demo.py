"""editlab demo: every piece at work in under a minute on a CPU, on the bundled toy model.

1. text to image: "a red circle on a blue background";
2. Prompt-to-Prompt word swap of that image: circle -> square, with the attention maps of both prompts;
3. edit-friendly DDPM inversion of a rendered toy picture (a "real" image the model never generated), then a
   colour edit: red -> green.
Every file is a PNG that records the parameters that made it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from inversion.ddpm_noise import DDPMInversionConfig
from ldm.images import check_output, save_png
from ldm.pipeline import SamplingConfig, decode_latents, text_to_image
from ldm.toy.shapes import render, spec_from_caption

from ..ddpm_edit.editor import DDPMEditConfig, invert_and_edit
from ..options import (add_model_arguments, add_sampler_arguments, check_sampler, load_model, run_parameters,
                       sampler_options)
from ..p2p import P2PConfig, attention_grid, prompt_to_prompt

NAME = "demo"
HELP = "generate, swap a word with Prompt-to-Prompt and edit a real image with DDPM inversion (toy model)"

SOURCE = "a red circle on a blue background"
SWAPPED = "a red square on a blue background"
RECOLOURED = "a green circle on a blue background"


def add_arguments(parser):
    add_model_arguments(parser, what="the toy model or any Stable Diffusion model", prompts=False)
    parser.add_argument("--out", type=Path, default=Path("editlab-demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    add_sampler_arguments(parser, "ddim")  # text to image and Prompt-to-Prompt; the DDPM edit keeps its sampler
    parser.add_argument("--force", action="store_true", help="overwrite outputs of another run")
    parser.set_defaults(out_is_folder=True)


def run(args):
    started = time.perf_counter()
    model = load_model(args)
    side = 64 if model.config.family == "toy" else 512
    cfg = SamplingConfig(steps=args.steps, guidance=7.5, seed=args.seed, height=side, width=side,
                         **sampler_options(args))
    check_sampler(model, cfg)
    base = run_parameters(args, cfg, command=NAME, negative=args.negative or "")
    inversion_cfg, edit_cfg = DDPMInversionConfig(), DDPMEditConfig()  # the paper's settings for SD
    if model.config.family == "toy":  # a small model that follows its prompt loosely: start later, guide less
        inversion_cfg, edit_cfg = DDPMInversionConfig(steps=50), DDPMEditConfig(skip=35, target_guidance=7.5)
    # the DDPM part runs its own sampler: DDPM with eta, steps and guidance of the inversion and edit configs
    ddpm_base = {**{k: v for k, v in base.items() if k not in ("guidance",)}, "scheduler": "ddpm",
                 "eta": inversion_cfg.eta, "steps": inversion_cfg.steps, "seed": args.seed}
    plan = {
        "1-generated.png": {**base, "method": "text-to-image", "prompt": SOURCE},
        "2-p2p-source.png": {**base, "method": "prompt-to-prompt", "prompt": SOURCE, "edit": SWAPPED},
        "2-p2p-swapped.png": {**base, "method": "prompt-to-prompt", "prompt": SOURCE, "edit": SWAPPED},
        "2-p2p-attention-source.png": {**base, "method": "prompt-to-prompt attention", "prompt": SOURCE},
        "2-p2p-attention-swapped.png": {**base, "method": "prompt-to-prompt attention", "prompt": SWAPPED},
        "3-ddpm-input.png": {"command": NAME, "method": "rendered toy image", "caption": SOURCE,
                             "center": [0.4, 0.55], "size": 0.4, "height": side, "width": side},
        "3-ddpm-edited.png": {**ddpm_base, "method": "edit-friendly DDPM inversion", "prompt": SOURCE,
                              "edit": RECOLOURED, "skip": edit_cfg.skip, "source_guidance": inversion_cfg.source_guidance,
                              "target_guidance": edit_cfg.target_guidance},
    }
    for name, params in plan.items():
        check_output(args.out / name, params, args.force)
    images = {}

    images["1-generated.png"] = decode_latents(model, text_to_image(model, [SOURCE], cfg, negative=args.negative))[0]

    p2p = prompt_to_prompt(model, SOURCE, SWAPPED, cfg, P2PConfig(cross_replace=0.8, self_replace=(0.0, 0.4)),
                           negative=args.negative, progress=True)
    source, swapped = decode_latents(model, p2p.latents)
    images["2-p2p-source.png"], images["2-p2p-swapped.png"] = source, swapped
    images["2-p2p-attention-source.png"] = attention_grid(model.tokenizer, SOURCE, p2p.maps[0])
    images["2-p2p-attention-swapped.png"] = attention_grid(model.tokenizer, SWAPPED, p2p.maps[1])

    picture, _ = render(spec_from_caption(SOURCE, center=(0.4, 0.55), size=0.4), resolution=side)
    real = torch.from_numpy(picture).permute(2, 0, 1).float()[None] / 255  # [H, W, 3] uint8 -> [1, 3, H, W]
    edited, _ = invert_and_edit(model, real, SOURCE, RECOLOURED, inversion_cfg, edit_cfg, seed=args.seed,
                                progress=True)
    images["3-ddpm-input.png"] = real[0]
    images["3-ddpm-edited.png"] = decode_latents(model, edited)[0]

    for name, image in images.items():
        print(save_png(args.out / name, image, plan[name], force=args.force))
    print(f"wrote {len(images)} images to {args.out}/ in {time.perf_counter() - started:.0f} s")
