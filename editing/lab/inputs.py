"""What the InstructPix2Pix, ControlNet, Style and Visii tabs share: toy-world default inputs, uploads, numbers on
the command line, and what a tab shows of a finished command.

An upload is passed to the command as a file copied into the run's folder under a fixed name (``image.png``), so
the command line a tab shows names it by that relative path and runs as shown in a folder holding the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ldm.toy import ShapeSpec, render

from .runner import CommandResult

# The default inputs: scenes of the toy world (ldm/toy/shapes.py), the ones the README's toy results use
TOY_SCENES = {
    "blue square": ShapeSpec("square", "blue", "white", size=0.42),
    "red circle": ShapeSpec("circle", "red", "white", size=0.42),
    "green circle": ShapeSpec("circle", "green", "white", size=0.42),
    "green square": ShapeSpec("square", "green", "white", size=0.42),
}


def toy_scene(name: str) -> Image.Image:
    """The toy scene ``name`` (``TOY_SCENES``) at the toy model's 64×64, as an RGB image."""
    return Image.fromarray(render(TOY_SCENES[name])[0])


def toy_scene_file(folder: Path, name: str) -> Path:
    """``toy_scene(name)`` saved as a PNG in ``folder`` (a default value for an upload box)."""
    path = Path(folder) / "defaults" / f"{name.replace(' ', '-')}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        toy_scene(name).save(path)
    return path


def upload(uploads: dict, name: str, given, default_scene: str) -> str:
    """Add the file ``given`` (a path from an upload box; None: the toy scene ``default_scene``) to ``uploads``
    under ``name`` and return ``name``, the path the command line gives for it."""
    uploads[name] = toy_scene(default_scene) if given in (None, "") else Path(given)
    return name


def number(value) -> str:
    """A knob's value as the command line writes it: ints as ints, floats in their shortest exact form."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


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


@dataclass
class Shown:
    """What a tab shows after a run: the PNGs the command wrote, its command line and its one-line message."""

    images: list[Path] = field(default_factory=list)
    command_line: str = ""
    message: str = ""  # the CLI's one-line error, or "" when the command ran
    folder: Path | None = None  # where the command ran (its uploads and outputs)

    @classmethod
    def of(cls, result: CommandResult) -> "Shown":
        return cls(list(result.outputs), result.command_line, result.error or "", result.folder)

    @property
    def ok(self) -> bool:
        return not self.message
