"""The inputs of the InstructPix2Pix, ControlNet, Style and Visii tabs: toy-world defaults and uploads.

An upload is passed to the command as a file copied into the run's folder under a fixed name (``image.png``), so
the command line a tab shows names it by that relative path and runs as shown in a folder holding the same file.
With no upload, the tab uses a scene of the toy world (ldm/toy/shapes.py), the kind of picture the toy models know.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ldm.toy import ShapeSpec, render

from ..cli import user_error_message
from . import ui
from .context import LabContext
from .runner import CommandResult

TOY_SCENES = {  # the README's toy examples
    "blue square": ShapeSpec("square", "blue", "white", size=0.42),
    "red circle": ShapeSpec("circle", "red", "white", size=0.42),
    "green circle": ShapeSpec("circle", "green", "white", size=0.42),
    "green square": ShapeSpec("square", "green", "white", size=0.42),
}


def toy_scene(name: str) -> Image.Image:
    """The toy scene ``name`` (``TOY_SCENES``) at the toy model's 64×64, as an RGB image."""
    return Image.fromarray(render(TOY_SCENES[name])[0])


def toy_scene_file(folder: Path, name: str) -> Path:
    """``toy_scene(name)`` saved as a PNG in ``folder`` (the default value of an upload box)."""
    path = Path(folder) / "defaults" / f"{name.replace(' ', '-')}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        toy_scene(name).save(path)
    return path


def upload(uploads: dict, stem: str, given, default_scene: str) -> str:
    """Add the file ``given`` (a path from an upload box; None: the toy scene ``default_scene``) to ``uploads``
    and return the name the command line gives it (``stem`` with the upload's extension)."""
    if given in (None, ""):
        name, uploads[f"{stem}.png"] = f"{stem}.png", toy_scene(default_scene)
        return name
    name = ui.upload_name(given, stem)
    uploads[name] = Path(given)
    return name


def readable_image(path) -> str | None:
    """``path`` when PIL can read it (for a preview box), else None; the command reports unreadable files."""
    if path in (None, ""):
        return None
    try:
        with Image.open(path) as image:
            image.verify()
        return str(path)
    except Exception:
        return None


def upload_box(label: str, default: Path) -> tuple:
    """An upload box (any file: an unreadable one reaches the command, which names the problem) and a preview."""
    import gradio as gr

    box = gr.File(label=label, file_types=["image"], type="filepath", value=str(default))
    preview = gr.Image(str(default), label=label, type="filepath", format="png", interactive=False, height=128,
                       elem_classes=["editlab-pixels"])  # the app's CSS enlarges it with square pixels
    box.change(readable_image, box, preview, **ui.PRIVATE)
    return box, preview


def run_knobs(lab: LabContext, command: str, arguments, knobs: dict, *outs: str) -> tuple[CommandResult | None, dict]:
    """Run ``arguments(**knobs)``; (the result, the values a tab shows: "image" = the first of ``outs`` the
    command wrote, its folder, the result panel's). Knobs that make no command line (``arguments`` raises
    ValueError: no ControlNet file, no block chosen) show the reason as the command line prints its errors."""
    try:
        command, args, uploads = arguments(**knobs)
    except ValueError as err:
        return None, {"image": None, "folder": None, "command_line": "", "files": None,
                      "message": user_error_message(command, err)}
    result = lab.run(command, args, uploads)
    image = next((path for path in (ui.output(result, out) for out in outs) if path), None)
    return result, {"image": image, "folder": str(result.folder), **ui.result_values(result)}
