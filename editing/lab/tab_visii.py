"""The Visii tab: learn an InstructPix2Pix instruction from one before/after pair, see its loss curve, apply it.

Visii (inversion/visii.py, docs/methods.md §10) optimises the text encoder's output states of an instruction so
that InstructPix2Pix, conditioned on "before", predicts the noise of "after"; a CLIP term keeps the instruction
pointing along the before → after direction. The tab runs two commands in one folder, as a shell would:

    editlab visii --before before.png --after after.png ... --out visii
    editlab ip2p --image image.png --instruction-embedding visii/instruction.safetensors ... --out visii-edit.png

and plots visii/losses.csv (each step's loss, its smoothed value, and the step whose states were kept).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .context import LabContext
from .inputs import Shown, number, readable_image, toy_scene_file, upload
from .runner import run_command

TITLE = "Visii"
COMMAND = "visii"
DEFAULTS = {"before": "red circle", "after": "green circle", "image": "blue square"}  # the README's toy example
RUN = "visii"  # the visii command's output folder, inside the run's folder
SEPARATOR = " && "  # between the two command lines the tab shows


def arguments(before=None, after=None, image=None, init: str = "make the shape", steps: int = 40, lr: float = 0.01,
              seed: int = 0, clip_weight: float = 0.1):
    """The ``editlab visii`` line: (command, arguments, uploads). The uploads include ``image`` (the new image
    the instruction is applied to, read by ``apply_arguments``' line in the same folder); None: toy scenes."""
    uploads: dict = {}
    args = ["--before", upload(uploads, "before.png", before, DEFAULTS["before"]),
            "--after", upload(uploads, "after.png", after, DEFAULTS["after"]),
            "--init", init, "--steps", number(steps), "--lr", number(lr), "--seed", number(seed),
            "--clip-weight", number(clip_weight), "--out", RUN]
    upload(uploads, "image.png", image, DEFAULTS["image"])
    return COMMAND, args, uploads


def apply_arguments(text_guidance: float = 7.5, image_guidance: float = 1.5, steps: int = 20,
                    scheduler: str = "ddim", seed: int = 0):
    """The ``editlab ip2p`` line that applies the learned instruction to image.png: (command, arguments, {})."""
    return "ip2p", ["--image", "image.png", "--instruction-embedding", f"{RUN}/instruction.safetensors",
                    "--text-guidance", number(text_guidance), "--image-guidance", number(image_guidance),
                    "--steps", number(steps), "--scheduler", scheduler, "--seed", number(seed),
                    "--out", "visii-edit.png"], {}


@dataclass
class VisiiShown(Shown):
    instruction: Path | None = None  # the learned instruction file
    losses: Path | None = None  # its loss log


def show(lab: LabContext, apply: dict | None = None, **knobs) -> VisiiShown:
    """Learn (``arguments(**knobs)``), then apply (``apply_arguments(**apply)``) in the same folder."""
    learned = lab.run(*arguments(**knobs))
    shown = VisiiShown(command_line=learned.command_line, message=learned.error or "", folder=learned.folder)
    if learned.error:
        return shown
    shown.instruction = learned.folder / RUN / "instruction.safetensors"
    shown.losses = learned.folder / RUN / "losses.csv"
    command, args, _ = apply_arguments(**(apply or {}))
    applied = run_command([command, *lab.model_arguments(), *args], learned.folder)
    shown.command_line += SEPARATOR + applied.command_line
    shown.images, shown.message = list(applied.outputs), applied.error or ""
    return shown


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


def summary(shown: VisiiShown) -> str:
    if shown.losses is None or not shown.losses.is_file():
        return ""
    rows = read_losses(shown.losses)
    best = next((r for r in rows if r["best"]), rows[-1])
    return (f"{len(rows)} steps; kept the states after step {best['step']} (smoothed loss {best['smoothed']:.4f}; "
            f"first step's loss {rows[0]['loss']:.4f}, last {rows[-1]['loss']:.4f})")


def build(lab: LabContext) -> None:
    import gradio as gr

    files = {name: str(toy_scene_file(lab.folder, scene)) for name, scene in DEFAULTS.items()}
    gr.Markdown("Learn an instruction from one example pair (Visii), then apply it to a new image with "
                "InstructPix2Pix. A few dozen steps take seconds on the toy model.")
    with gr.Row():
        with gr.Column():
            with gr.Row():
                before = gr.File(label="before", file_types=["image"], type="filepath", value=files["before"])
                after = gr.File(label="after", file_types=["image"], type="filepath", value=files["after"])
            with gr.Row():
                before_preview = gr.Image(label="before", type="filepath", interactive=False, height=160,
                                          value=files["before"])
                after_preview = gr.Image(label="after", type="filepath", interactive=False, height=160,
                                         value=files["after"])
            init = gr.Textbox(label="instruction to start from", value="make the shape")
            with gr.Row():
                steps = gr.Slider(1, 1000, value=40, step=1, label="learning steps")
                lr = gr.Number(value=0.01, label="learning rate")
                clip_weight = gr.Slider(0, 1, value=0.1, step=0.05, label="λ_clip")
                seed = gr.Number(value=0, precision=0, label="seed")
            image = gr.File(label="new image to apply it to", file_types=["image"], type="filepath",
                            value=files["image"])
            image_preview = gr.Image(label="new image", type="filepath", interactive=False, height=160,
                                      value=files["image"])
            with gr.Row():
                text_guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="s_T")
                image_guidance = gr.Slider(0, 5, value=1.5, step=0.1, label="s_I")
                apply_steps = gr.Slider(1, 100, value=20, step=1, label="editing steps")
            go = gr.Button("Learn and apply", variant="primary")
        with gr.Column():
            message = gr.Textbox(label="message", interactive=False, max_lines=1)
            learned = gr.Textbox(label="learned instruction", interactive=False)
            curve = gr.LinePlot(loss_table(None), x="step", y="value", color="curve", label="loss per step",
                                x_title="step", y_title="loss")
            result = gr.Image(label="the instruction applied (the command's PNG)", type="filepath",
                              interactive=False)
            command_line = gr.Code(label="command lines (run them in a folder holding before.png, after.png and "
                                         "image.png)", language="shell")
            downloads = gr.File(label="instruction and PNG", file_count="multiple", interactive=False)

    for box, shown_box in ((before, before_preview), (after, after_preview), (image, image_preview)):
        box.change(readable_image, box, shown_box, api_visibility="private")

    def run(before, after, image, init, steps, lr, clip_weight, seed, text_guidance, image_guidance, apply_steps,
            progress=gr.Progress(track_tqdm=True)):
        shown = show(lab, before=before, after=after, image=image, init=init, steps=steps, lr=lr,
                     clip_weight=clip_weight, seed=seed,
                     apply=dict(text_guidance=text_guidance, image_guidance=image_guidance, steps=apply_steps))
        paths = [str(p) for p in shown.images]
        kept = [str(shown.instruction)] if shown.instruction is not None and shown.instruction.is_file() else []
        return (shown.message, summary(shown), loss_table(shown.losses if shown.losses else None),
                paths[0] if paths else None, shown.command_line, kept + paths or None)

    go.click(run, [before, after, image, init, steps, lr, clip_weight, seed, text_guidance, image_guidance,
                   apply_steps], [message, learned, curve, result, command_line, downloads], api_name="visii")
