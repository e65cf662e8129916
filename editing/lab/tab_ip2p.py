"""The InstructPix2Pix tab: an image and a written instruction, the two guidance scales, and their grid.

InstructPix2Pix (docs/methods.md §6) guides with two scales,

    ε̂ = ε(z, ∅, ∅) + s_I·(ε(z, c_I, ∅) − ε(z, ∅, ∅)) + s_T·(ε(z, c_I, c_T) − ε(z, c_I, ∅)):

s_T pushes towards the instruction c_T, s_I towards the input image c_I.
The grid runs ``editlab ip2p --grid-text ... --grid-image ...``: one edit per (s_T, s_I), s_T across and s_I down,
so a student sees where the edit starts to happen and where the input is lost.
"""

from __future__ import annotations

from . import ui
from .context import LabContext
from .inputs import run_knobs, toy_scene_file, upload, upload_box

TITLE = "InstructPix2Pix"
DEFAULT_SCENE = "blue square"
SCHEDULERS = ("ddim", "euler-a")  # the paper samples with Euler ancestral; DDIM is deterministic for a seed
EDIT_OUT, GRID_OUT = "edit.png", "grid.png"


def arguments(image=None, instruction: str = "make the square green", text_guidance: float = 7.5,
              image_guidance: float = 1.5, steps: int = 20, scheduler: str = "ddim", seed: int = 0,
              grid: bool = False, grid_text: str = "3,7.5,12", grid_image: str = "1,1.5,2.5"):
    """The ``editlab ip2p`` line of these knobs: (command, arguments, uploads). ``image``: a file path, or None
    for the toy scene of a blue square."""
    uploads: dict = {}
    args = ["--image", upload(uploads, "image", image, DEFAULT_SCENE), "--instruction", instruction,
            "--steps", ui.number(steps), "--scheduler", scheduler, "--seed", ui.number(seed)]
    if grid:
        args += ["--grid-text", grid_text, "--grid-image", grid_image, "--out", GRID_OUT]
    else:
        args += ["--text-guidance", ui.number(text_guidance), "--image-guidance", ui.number(image_guidance),
                 "--out", EDIT_OUT]
    return "ip2p", args, uploads


def handle(lab: LabContext, **knobs) -> dict:
    """Run the command; what the page shows, by name (in grid mode: the grid, then each cell)."""
    result, shown = run_knobs(lab, "ip2p", arguments, knobs, GRID_OUT, EDIT_OUT)
    return {**shown, "cells": [str(path) for path in result.outputs if str(path) != shown["image"]]}


def build(lab: LabContext) -> None:
    import gradio as gr

    gr.Markdown("Edit an image by a written instruction. **s_T** (text guidance) pulls towards the instruction, "
                "**s_I** (image guidance) towards the input; the grid shows every pair of the listed scales.")
    with gr.Row():
        with gr.Column():
            image, _ = upload_box("input image (default: a toy scene)", toy_scene_file(lab.folder, DEFAULT_SCENE))
            knobs = {
                "image": image,
                "instruction": gr.Textbox(label="instruction", value="make the square green"),
                "text_guidance": gr.Slider(0, 15, value=7.5, step=0.5, label="s_T (text guidance)"),
                "image_guidance": gr.Slider(0, 5, value=1.5, step=0.1, label="s_I (image guidance)"),
                "steps": gr.Slider(1, 100, value=20, step=1, label="steps"),
                "scheduler": gr.Dropdown(list(SCHEDULERS), value="ddim", label="sampler"),
                "seed": gr.Number(value=0, precision=0, label="seed"),
                "grid": gr.Checkbox(label="s_T × s_I grid instead of one edit", value=False),
                "grid_text": gr.Textbox(label="grid s_T values", value="3,7.5,12"),
                "grid_image": gr.Textbox(label="grid s_I values", value="1,1.5,2.5"),
            }
            run, stop = ui.run_buttons()
        with gr.Column():
            shown = {"image": ui.image("edit (or the grid: s_T across, s_I down)", pixels=False),
                     "cells": gr.Gallery(label="grid cells", columns=3, height=200)}
            shown.update(ui.result_panel())
    ui.wire(lab, run, stop, handle, knobs, shown)
