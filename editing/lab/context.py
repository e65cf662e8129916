"""What every tab of the lab shares: the weights it runs on, the folder it writes into, the threads."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from .runner import CommandResult, run_command, stop_running


@dataclass
class LabContext:
    folder: Path  # every run writes into its own numbered subfolder of this one
    weights: Path | None = None  # None: each command's default, the bundled toy model
    threads: int = 1  # recorded in every PNG; the shown command line passes the same number
    _runs: itertools.count = field(default_factory=itertools.count, repr=False)

    def __post_init__(self):
        self.folder = Path(self.folder).resolve()  # the web server serves files by absolute path
        if self.weights is not None:
            self.weights = Path(self.weights).resolve()  # so the shown command line works in any folder

    def model_arguments(self) -> list[str]:
        """The arguments every command line starts with after its name."""
        return (["--weights", str(self.weights)] if self.weights is not None else []) + ["--threads", str(self.threads)]

    def run(self, command: str, arguments: list[str], uploads: dict[str, object] | None = None) -> CommandResult:
        """Run ``editlab command`` with the model arguments first, in a fresh subfolder of ``folder``.

        ``uploads`` maps a file name to a PIL image (or a path to copy): each is saved in the subfolder first so
        the command line can name it as a relative path (``--image source.png``).
        """
        folder = self.folder / f"run-{next(self._runs):04d}"
        while folder.exists():  # a --folder reused from an earlier session keeps its runs
            folder = self.folder / f"run-{next(self._runs):04d}"
        folder.mkdir(parents=True)
        for name, image in (uploads or {}).items():
            if hasattr(image, "save"):
                image.save(folder / name)
            else:
                (folder / name).write_bytes(Path(image).read_bytes())
        return run_command([command, *self.model_arguments(), *arguments], folder)

    def stop(self) -> bool:
        """Stop the command running now (the Stop button); True if one was running."""
        return stop_running()
