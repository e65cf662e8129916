"""Stopping a long run cleanly, and refusing to start over one that was stopped.

The contract every long command keeps (training, embedding optimisation, make-pairs):

- Ctrl-C (SIGINT; also SIGTERM, which schedulers and torchrun send before killing) does not raise at once: it
  sets a flag that the run checks after each step. The run then saves its checkpoint at the step it reached
  and raises ``Interrupted``; the command line prints one line, "interrupted at step N; saved PATH; rerun with
  --resume", and exits with status 130 (128 + SIGINT, what shells report for Ctrl-C). A second Ctrl-C stops
  at once (the last checkpoint written stays valid: every write is atomic).
- Under torchrun every process must stop at the same step (the gradient all-reduce would otherwise hang), so
  the flag is agreed across processes (``StopFlag.agreed``: a max-reduction of one number per step).
- A checkpoint records the options that change the result (``check_options``); a rerun with ``--resume`` and
  another value names the option. A rerun *without* ``--resume`` over an unfinished run's checkpoint is
  refused (``check_fresh_start``): ``--resume`` continues it, ``--force`` starts over.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Interrupted(Exception):
    """A run stopped on request after saving; ``str`` is the one line the command line prints."""

    def __init__(self, where: str, saved: str | Path):
        super().__init__(f"interrupted at {where}; saved {saved}; rerun with --resume")
        self.where, self.saved = where, saved


class StopFlag:
    """Context manager: while inside, SIGINT/SIGTERM set ``requested`` instead of killing the process (only
    in the main thread, where Python delivers signals). A second signal raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self) -> bool:
        """True when any process was asked to stop (the same answer on every process)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
            flag = torch.tensor([float(self.requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested


def read_header(path: str | Path) -> dict | None:
    """A checkpoint's small entries (step, steps, finished, options) without reading its tensors (the file
    is memory-mapped), or None when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {key: state.get(key) for key in ("step", "steps", "finished", "options")}


def check_fresh_start(path: str | Path, resume: bool, force: bool) -> None:
    """Refuse to start a new run over the checkpoint of an unfinished one (interrupted or killed) unless
    ``force``; with ``resume`` there must be a checkpoint."""
    header = read_header(path)
    if resume:
        if header is None:
            raise FileNotFoundError(f"no checkpoint at {path}; start without --resume")
        return
    if header is not None and not header.get("finished") and not force:
        steps = f" of {header['steps']}" if header.get("steps") else ""
        raise FileExistsError(f"{path} holds an unfinished run (step {header.get('step')}{steps}); rerun with "
                              "--resume to continue it, or --force to start over")


def check_options(recorded: dict | None, current: dict | None) -> None:
    """ValueError naming the first option whose value differs between a checkpoint and this run."""
    recorded, current = recorded or {}, current or {}
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            raise ValueError(f"{name}: the checkpoint's run used {recorded.get(name)!r}, this run "
                             f"{current.get(name)!r}; resume with the same {name}, or start over with --force")
