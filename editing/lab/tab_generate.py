"""The Generate tab: text to image with classifier-free guidance (``editlab generate``).

The knobs are the sampling loop's: the prompt and the negative prompt (the unconditional branch of guidance,
ε̂ = ε(x, ∅ or negative) + w·(ε(x, prompt) − ε(x, ∅ or negative))), the sampler, the number of steps, the
guidance scale w and the seed of the starting noise x_T. Same seed, same knobs: the same PNG.
"""

from __future__ import annotations

import gradio as gr

from ldm.schedulers import SAMPLERS

from . import ui
from .context import LabContext

TITLE = "Generate"
OUT = "out.png"


def arguments(prompt: str, negative: str = "", sampler: str = "ddim", steps: int = 20, guidance: float = 7.5,
              seed: int = 0) -> tuple[str, list[str], dict]:
    """The ``editlab generate`` arguments of the knobs (after the model arguments)."""
    argv = ["--prompt", prompt, "--scheduler", sampler, "--steps", ui.number(steps), "--guidance",
            ui.number(guidance), "--seed", ui.number(seed)]
    if negative:
        argv += ["--negative", negative]
    return "generate", argv + ["--out", OUT], {}


def handle(lab: LabContext, **knobs) -> dict:
    """Run the command; what the page shows, by name."""
    result = lab.run(*arguments(**knobs))
    return {"image": ui.output(result, OUT), **ui.result_values(result)}


def build(lab: LabContext) -> None:
    with gr.Row():
        with gr.Column():
            knobs = {
                "prompt": gr.Textbox(label="prompt", value="a red circle on a blue background"),
                "negative": gr.Textbox(label="negative prompt (the unconditional branch of guidance)", value=""),
                "sampler": gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler"),
                "steps": gr.Slider(1, 100, value=20, step=1, label="steps"),
                "guidance": gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale w"),
                "seed": gr.Number(value=0, precision=0, label="seed (of the starting noise x_T)"),
            }
            run, stop = ui.run_buttons()
        with gr.Column():
            shown = {"image": ui.image("generated")}
            shown.update(ui.result_panel())
    ui.wire(lab, run, stop, handle, knobs, shown)
