"""Peak resident memory (CPU) of one run, measured in a fresh process.

On a GPU, ``torch.cuda.max_memory_allocated`` gives the peak of each run directly. On the CPU there is no
allocator counter, so each contender runs in its own freshly spawned Python process:

    build the model (same seed, same config)      -> resident set R_0
    reset the kernel's high-water mark            (Linux: write "5" to /proc/self/clear_refs)
    run the contender once                        -> high-water mark R_peak (VmHWM in /proc/self/status)

R_peak counts everything resident, weights included, as max_memory_allocated counts every tensor; the
working memory of the run is R_peak − R_0. A fresh process per contender keeps one run's freed-but-cached
heap from hiding the other's peak. Linux only (it reads /proc); elsewhere the caller gets a clear error.
"""

from __future__ import annotations

import multiprocessing
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class ResidentPeak:
    name: str
    before_bytes: int  # resident after the model was built, before the run
    peak_bytes: int  # high-water mark during the run (weights included)

    @property
    def working_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _child(setup: Callable[..., Callable[[], object]], args: tuple, threads: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    run = setup(*args)
    before = _status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")  # VmHWM <- current resident set
    run()
    queue.put((before, _status_bytes("VmHWM")))


def resident_peak(name: str, setup: Callable[..., Callable[[], object]], args: tuple, threads: int) -> ResidentPeak:
    """Run ``setup(*args)()`` in a spawned process; ``setup`` must be a module-level function (it is
    pickled by reference) that builds everything and returns the callable to measure."""
    if not (STATUS.is_file() and CLEAR_REFS.exists()):
        raise RuntimeError("CPU peak memory needs Linux /proc (VmHWM, clear_refs); measure on Linux or on a GPU")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(setup, args, threads, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the {name} run for the memory measurement failed (exit code {process.exitcode})")
    before, peak = queue.get()
    return ResidentPeak(name, before, peak)
