"""Run an ``editlab`` command in this process, as the shell would, and say what it wrote.

The lab never computes an image itself: a tab turns its knobs into the argument list of an ``editlab`` command and
runs it here, so the command line it shows is the whole recipe of what it shows. Errors a user can fix come back as
the CLI's own one-line message (``editlab p2p: error: ...``), never a traceback, and the server keeps serving.

Stopping a run: the web server cannot kill the thread a command runs in, so ``stop_running`` asks Python to raise
``Stopped`` inside that thread (``PyThreadState_SetAsyncExc``); it is raised at the next Python line the command
runs, after the torch operation in progress returns, so a UNet call finishes and nothing is written afterwards
(every output is written atomically, at the end).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import build_parser, user_error_message


_ONE_AT_A_TIME = threading.Lock()  # the working folder is the process's: one command runs at a time
_STOP_GUARD = threading.Lock()  # guards _running: a stop is delivered at most once, and only inside a command
_running: int | None = None  # thread id of the command running now, while it may be stopped


class Stopped(Exception):
    """Raised inside a running command by ``stop_running`` (the lab's Stop button)."""


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> None:
    """Schedule ``exception`` in thread ``thread_id`` (None: withdraw one not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exception) if exception else None)


def stop_running() -> bool:
    """Stop the command running now, if any; True if one was asked to stop."""
    global _running
    with _STOP_GUARD:
        thread_id, _running = _running, None  # at most one delivery per run
        if thread_id is not None:
            _raise_in_thread(thread_id, Stopped)
    return thread_id is not None


def _run_stoppable(run, args) -> None:
    """``run(args)`` in this thread, stoppable by ``stop_running`` until it returns, and never after: on the way
    out a stop that was asked for but not yet raised is withdrawn, under the same lock that delivers it."""
    global _running
    try:
        with _STOP_GUARD:
            _running = threading.get_ident()
        run(args)
    finally:
        with _STOP_GUARD:
            _running = None
            _raise_in_thread(threading.get_ident(), None)


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
            _run_stoppable(args.run, args)
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
