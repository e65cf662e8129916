"""Run an ``editlab`` command in this process, as the shell would, and say what it wrote.

The lab never computes an image itself: a tab turns its knobs into the argument list of an ``editlab`` command and
runs it here, so the command line it shows is the whole recipe of what it shows. Errors a user can fix come back as
the CLI's own one-line message (``editlab p2p: error: ...``), never a traceback, and the server keeps serving.

Stopping a run: the web server cannot kill the thread a command runs in, and an exception forced into it at an
arbitrary point could land inside an import or a context manager's exit and leave the process broken. So a stop
is cooperative: ``stop_running`` sets a flag, and every loop of the commands (they all iterate with tqdm: sampling
steps, inversion steps, training steps) checks it between two iterations and raises ``Stopped`` there. Outputs are
written at the end, atomically, so a stopped run leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import build_parser, user_error_message


_ONE_AT_A_TIME = threading.Lock()  # the working folder is the process's: one command runs at a time
_STOP_GUARD = threading.Lock()  # guards _running and _stop together
_running = False  # a command is running now (and may be stopped)
_stop = threading.Event()  # set by stop_running; checked between two iterations of any tqdm loop


class Stopped(Exception):
    """Raised inside a running command, between two steps, after ``stop_running`` (the lab's Stop button)."""


def stop_running() -> bool:
    """Ask the command running now to stop at its next step; True if one was running."""
    with _STOP_GUARD:
        if _running:
            _stop.set()
        return _running


@contextlib.contextmanager
def _stoppable():
    """While inside, every tqdm loop in the process checks the stop flag after each iteration.

    tqdm's ``__iter__`` is wrapped for the time of the command, around whatever it is now (Gradio replaces it to
    follow the progress, ``gr.Progress(track_tqdm=True)``), and put back afterwards.
    """
    import tqdm

    global _running
    iterate = tqdm.tqdm.__iter__

    def checked(self):
        for item in iterate(self):
            yield item
            if _stop.is_set():
                raise Stopped

    with _STOP_GUARD:
        _stop.clear()
        _running = True
    tqdm.tqdm.__iter__ = checked
    try:
        yield
    finally:
        tqdm.tqdm.__iter__ = iterate
        with _STOP_GUARD:
            _running = False
            _stop.clear()


@contextlib.contextmanager
def _working_folder(folder: Path):
    with _ONE_AT_A_TIME:
        before = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(before)


@dataclass
class CommandResult:
    argv: list[str]  # the arguments after ``editlab``
    folder: Path  # the working folder the command ran in: relative --out paths are inside it
    printed: str = ""  # what the command printed (the paths it wrote, one a line, for most commands)
    error: str | None = None  # the CLI's one-line message when the command refused its input
    outputs: list[Path] = field(default_factory=list)  # PNG files the command wrote, in the order it printed them

    @property
    def command_line(self) -> str:
        """The shell line that reproduces this result (run it in an empty folder)."""
        return shlex.join(["editlab", *self.argv])


def run_command(argv: list[str], folder: str | Path) -> CommandResult:
    """Run ``editlab *argv`` with ``folder`` as the working folder for its relative paths.

    Relative paths in ``argv`` are resolved against ``folder`` (the lab writes uploads and outputs there), so the
    argument list stays the one a user types in a shell opened in that folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = CommandResult(argv=list(argv), folder=folder)
    parser = build_parser()
    stdout = io.StringIO()
    with _working_folder(folder), contextlib.redirect_stdout(stdout):
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # argparse already wrote its usage line to stderr; the lab builds valid lines
            result.error = f"editlab: the arguments were not understood: {shlex.join(argv)}"
            return result
        try:
            from ..preflight import check_before_work

            check_before_work(args)
            with _stoppable():
                args.run(args)
        except Stopped:
            result.error = f"editlab {args.command}: stopped"
            return result
        except Exception as err:
            result.error = user_error_message(args.command, err)
            if result.error is None:
                raise
    result.printed = stdout.getvalue()
    result.outputs = [folder / line.strip() for line in result.printed.splitlines()
                      if line.strip().endswith(".png") and (folder / line.strip()).is_file()]
    return result
