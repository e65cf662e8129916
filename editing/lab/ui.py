"""What the lab's own tabs share: the result panel under every result, and the Run/Stop wiring.

A tab is written in two layers so that it can be tested without a browser:

- plain functions: ``arguments(**knobs) -> (command, argument list, uploads)`` turns the knobs into an ``editlab``
  command, and ``handle(lab, **knobs) -> dict`` runs it (``LabContext.run``) and returns what the page shows, by
  name (image paths, the command line, the message);
- ``build(lab)`` lays out the Gradio components and connects them to ``handle`` with ``wire``, which adds the
  progress bar (Gradio follows the command's own tqdm bars) and the Stop button.

Nothing here computes an image: every picture on the page is a PNG an ``editlab`` command wrote, with its
parameters in the file, and the command line beside it writes the same bytes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import gradio as gr

from .context import LabContext
from .runner import CommandResult

# Gradio 5 and 6 (both supported: 5 installs beside older transformers) name two settings differently
GRADIO_6 = int(gr.__version__.split(".")[0]) >= 6
PRIVATE = {"api_visibility": "private"} if GRADIO_6 else {"show_api": False}  # an event kept out of the page's API


def number(value) -> str:
    """A knob's value as a command-line argument: integers without a decimal point, others to 10 significant
    digits (a slider's 0.30000000000000004 reads 0.3). The app runs the very string the command line shows, so
    both run with the same number. An empty number field gives "", which the command refuses in one line."""
    if value is None or value == "":
        return ""
    value = float(value)
    return str(int(value)) if value.is_integer() else format(value, ".10g")


def upload_name(path: str | Path, stem: str = "input") -> str:
    """The name an uploaded file gets in the run's folder, keeping its extension (``input.png``)."""
    suffix = Path(path).suffix.lower()
    return f"{stem}{suffix if suffix else '.png'}"


def words(text: str) -> list[str]:
    """Space- or comma-separated words of a text box."""
    return [word for word in text.replace(",", " ").split() if word]


def result_values(result: CommandResult) -> dict:
    """The result panel's values: the command line, the one-line message, the files to download."""
    if result.error:
        message = result.error
    else:
        message = f"done: {len(result.outputs)} PNG file(s) in {result.folder}"
    return {"command_line": result.command_line, "message": message,
            "files": [str(path) for path in result.outputs] or None}


def output(result: CommandResult, name: str) -> str | None:
    """The path of the output file called ``name`` (e.g. ``source.png``), or None if the run did not write it."""
    for path in result.outputs:
        if path.name == name:
            return str(path)
    return None


def result_panel() -> dict[str, gr.components.Component]:
    """The command line, the message box and the downloads, under a tab's result."""
    panel = {
        "command_line": gr.Code(label="command line (run it in a folder holding the uploads: same PNG bytes)",
                                language="shell", interactive=False, wrap_lines=True, elem_classes=["editlab-command"]),
        "message": gr.Textbox(label="message", interactive=False, elem_classes=["editlab-message"]),
    }
    with gr.Accordion("download every PNG of this run (each carries its parameters)", open=False):
        panel["files"] = gr.File(show_label=False, file_count="multiple", interactive=False)
    return panel


def image(label: str, elem_id: str | None = None, height: int = 256, pixels: bool = True) -> gr.Image:
    """A result image. ``pixels``: a small picture (the toy model draws 64×64) enlarged to ``height`` with its
    pixels kept square; otherwise (the attention grids) shown as it is, shrunk to fit."""
    return gr.Image(label=label, type="filepath", format="png", interactive=False, height=height, elem_id=elem_id,
                    elem_classes=["editlab-pixels"] if pixels else None)


CSS = """.editlab-pixels img { image-rendering: pixelated; width: 100% !important; height: 100% !important;
                         object-fit: contain; }"""  # small images enlarged without blur


def run_buttons() -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        return gr.Button("Run", variant="primary"), gr.Button("Stop", variant="stop")


def wire(lab: LabContext, run: gr.Button, stop: gr.Button, handle: Callable[..., dict],
         inputs: dict[str, gr.components.Component], outputs: dict[str, gr.components.Component]):
    """Run ``handle(lab, **knobs)`` on a click of ``run``; ``stop`` stops the command and cancels the event.

    ``inputs`` maps each knob name of ``handle`` to its component, ``outputs`` each key of the dict it returns
    to the component that shows it. An error shows in the message box and as a warning; the server keeps
    serving, and the next run starts from scratch in a fresh folder.
    """
    names, shown = list(inputs), list(outputs)

    def on_run(*values):
        *knobs, _ = values  # the last: Gradio's progress tracker, where the signature below names it
        values_by_name = handle(lab, **dict(zip(names, knobs)))
        if ": error: " in values_by_name.get("message", ""):
            gr.Warning(values_by_name["message"])
        return [values_by_name.get(name) for name in shown]

    # Gradio reads the signature: one parameter per input, then the progress tracker (following the command's
    # tqdm bars); a plain ``*values`` would hide the tracker from it
    parameter = inspect.Parameter
    on_run.__signature__ = inspect.Signature(
        [parameter(name, parameter.POSITIONAL_OR_KEYWORD) for name in names]
        + [parameter("progress", parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress(track_tqdm=True))])

    event = run.click(on_run, list(inputs.values()), list(outputs.values()), concurrency_id="editlab",
                      concurrency_limit=1)

    def on_stop():
        stopped = lab.stop()
        return "stopped" if stopped else "nothing was running"

    stop.click(on_stop, None, outputs["message"], cancels=[event], queue=False)
    return event
