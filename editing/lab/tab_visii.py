"""The Visii tab: learn an InstructPix2Pix instruction from one before/after pair, see its loss curve, apply it.

Visii (docs/methods.md §10) optimises the text encoder's output states c_T of an instruction so that
InstructPix2Pix, conditioned on "before", predicts the noise added to "after":

    L = ‖ε − ε̂(z_t, t, before, c_T)‖² + λ_clip · (CLIP term keeping c_T along the before → after direction).

The tab runs two commands in one folder, as a shell would:

    editlab visii --before before.png --after after.png ... --out visii
    editlab ip2p --image image.png --instruction-embedding visii/instruction.safetensors ... --out visii-edit.png

and plots visii/losses.csv (each step's loss, its smoothed value, and the step whose states were kept).
"""

from __future__ import annotations

import csv
from pathlib import Path

from . import ui
from .context import LabContext
from .inputs import toy_scene_file, upload, upload_box
from .runner import run_command

TITLE = "Visii"
DEFAULTS = {"before": "red circle", "after": "green circle", "image": "blue square"}  # the README's toy example
RUN = "visii"  # the visii command's output folder, inside the run's folder
OUT = "visii-edit.png"
SEPARATOR = " && "  # between the two command lines the tab shows


def arguments(before=None, after=None, image=None, init: str = "make the shape", steps: int = 40, lr: float = 0.01,
              seed: int = 0, clip_weight: float = 0.1):
    """The ``editlab visii`` line: (command, arguments, uploads). The uploads include the new image the
    instruction is applied to (named image.png, read by ``apply_arguments``' line in the same folder); None: the
    toy scenes of ``DEFAULTS``."""
    uploads: dict = {}
    args = ["--before", upload(uploads, "before", before, DEFAULTS["before"]),
            "--after", upload(uploads, "after", after, DEFAULTS["after"]),
            "--init", init, "--steps", ui.number(steps), "--lr", ui.number(lr), "--seed", ui.number(seed),
            "--clip-weight", ui.number(clip_weight), "--out", RUN]
    upload(uploads, "image", image, DEFAULTS["image"])
    return "visii", args, uploads


def apply_arguments(image=None, text_guidance: float = 7.5, image_guidance: float = 1.5, steps: int = 20,
                    scheduler: str = "ddim", seed: int = 0):
    """The ``editlab ip2p`` line that applies the learned instruction to the new image (uploaded with the visii
    line): (command, arguments, {})."""
    return "ip2p", ["--image", upload({}, "image", image, DEFAULTS["image"]),
                    "--instruction-embedding", f"{RUN}/instruction.safetensors",
                    "--text-guidance", ui.number(text_guidance), "--image-guidance", ui.number(image_guidance),
                    "--steps", ui.number(steps), "--scheduler", scheduler, "--seed", ui.number(seed), "--out", OUT], {}


def handle(lab: LabContext, before=None, after=None, image=None, init: str = "make the shape", steps: int = 40,
           lr: float = 0.01, seed: int = 0, clip_weight: float = 0.1, text_guidance: float = 7.5,
           image_guidance: float = 1.5, apply_steps: int = 20) -> dict:
    """Learn, then apply the instruction in the same folder; what the page shows, by name."""
    learned = lab.run(*arguments(before, after, image, init, steps, lr, seed, clip_weight))
    shown = {"folder": str(learned.folder), "image": None, "curve": loss_table(None), "learned": "",
             **ui.result_values(learned)}
    if learned.error:
        return shown
    losses = learned.folder / RUN / "losses.csv"
    command, args, _ = apply_arguments(image, text_guidance, image_guidance, apply_steps, seed=seed)  # one seed
    applied = run_command([command, *lab.model_arguments(), *args], learned.folder)
    values = ui.result_values(applied)
    instruction = str(learned.folder / RUN / "instruction.safetensors")
    return {**shown, **values, "command_line": learned.command_line + SEPARATOR + applied.command_line,
            "image": ui.output(applied, OUT), "files": [instruction, *(values["files"] or [])],
            "curve": loss_table(losses), "learned": summary(losses, init)}


def read_losses(path: Path) -> list[dict]:
    """The rows of a visii losses.csv: {"step": int, "loss": float, "smoothed": float, "best": bool}."""
    with open(path, newline="") as f:
        return [{"step": int(row["step"]), "loss": float(row["loss"]), "smoothed": float(row["smoothed"]),
                 "best": row["best"] == "1"} for row in csv.DictReader(f)]


def loss_table(path: Path | None):
    """The loss log in long form for a line plot: columns step, value, curve ("loss" or "smoothed")."""
    import pandas as pd

    rows = read_losses(path) if path is not None else []
    return pd.DataFrame([{"step": r["step"], "value": r[curve], "curve": curve}
                         for r in rows for curve in ("loss", "smoothed")], columns=["step", "value", "curve"])


def summary(losses: Path, init: str) -> str:
    rows = read_losses(losses)
    best = next((r for r in rows if r["best"]), rows[-1])
    return (f"learned from {init!r} in {len(rows)} steps: kept the states after step {best['step']} (smoothed "
            f"loss {best['smoothed']:.4f}; loss of the first step {rows[0]['loss']:.4f}, of the last "
            f"{rows[-1]['loss']:.4f}); the file is {RUN}/instruction.safetensors")


def build(lab: LabContext) -> None:
    import gradio as gr

    gr.Markdown("Learn an instruction from one example pair (Visii), then apply it to a new image with "
                "InstructPix2Pix. A few dozen steps take seconds on the toy model and show the loss curve, but "
                "do not learn the edit yet: the README's red → green example turns the blue square green after "
                "1000 steps at learning rate 0.01 (under a minute on one CPU thread); 40 to 200 steps leave it "
                "blue (measured).")
    boxes = {name: toy_scene_file(lab.folder, scene) for name, scene in DEFAULTS.items()}
    with gr.Row():
        with gr.Column():
            with gr.Row():
                with gr.Column():
                    before, _ = upload_box("before", boxes["before"])
                with gr.Column():
                    after, _ = upload_box("after", boxes["after"])
            knobs = {
                "before": before, "after": after,
                "init": gr.Textbox(label="instruction to start from", value="make the shape"),
                "steps": gr.Slider(1, 1000, value=40, step=1, label="learning steps"),
                "lr": gr.Number(value=0.01, label="learning rate"),
                "clip_weight": gr.Slider(0, 1, value=0.1, step=0.05, label="λ_clip (0: no CLIP term)"),
                "seed": gr.Number(value=0, precision=0, label="seed"),
            }
            knobs["image"], _ = upload_box("new image to apply it to", boxes["image"])
            knobs.update({
                "text_guidance": gr.Slider(0, 15, value=7.5, step=0.5, label="s_T"),
                "image_guidance": gr.Slider(0, 5, value=1.5, step=0.1, label="s_I"),
                "apply_steps": gr.Slider(1, 100, value=20, step=1, label="editing steps"),
            })
            run, stop = ui.run_buttons()
        with gr.Column():
            shown = {"learned": gr.Textbox(label="learned instruction", interactive=False),
                     "curve": gr.LinePlot(loss_table(None), x="step", y="value", color="curve",
                                          label="loss per step (raw and smoothed)", x_title="step", y_title="loss"),
                     "image": ui.image("the instruction applied to the new image")}
            shown.update(ui.result_panel())
    ui.wire(lab, run, stop, handle, knobs, shown)
