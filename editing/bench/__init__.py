"""Side-by-side benchmarks: editlab and diffusers on the same config, weights, dtype and inputs, timed in
alternation in one run, so that their ratio is meaningful on a noisy machine (docs/performance.md §3)."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this process (all its threads)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runs: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict[str, Timing]:
    """Run each callable ``warmup`` times, then ``repeats`` rounds in alternating order (A B, B A, ...);
    record wall seconds and CPU seconds per call and, on CUDA, the peak allocated memory of each. On a shared
    CPU the CPU seconds of a single-threaded run barely depend on other jobs, which only add wall time."""
    timings = {name: Timing(name) for name in runs}
    for name, fn in runs.items():
        for _ in range(warmup):
            fn()
    order = list(runs)
    for round_index in range(repeats):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            runs[name]()
            _sync(device)
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].cpu_seconds.append(time.process_time() - cpu_start)
            if device.type == "cuda":
                timings[name].peak_bytes = max(timings[name].peak_bytes or 0, torch.cuda.max_memory_allocated(device))
    return timings


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}"


def report(title: str, timings: dict[str, Timing], per: str = "call", calls: int = 1) -> str:
    """A small table: median seconds per ``per`` for each contender and the editlab / diffusers ratio."""
    lines = [title]
    for t in timings.values():
        memory = f", peak {t.peak_bytes / 2**20:.0f} MiB" if t.peak_bytes else ""
        lines.append(f"  {t.name:9s} {t.median / calls:.4f} s per {per} (median of {len(t.seconds)}){memory}")
    if {"editlab", "diffusers"} <= set(timings):
        ours, theirs = timings["editlab"].seconds, timings["diffusers"].seconds
        paired = statistics.median(a / b for a, b in zip(ours, theirs))  # rounds ran back to back
        lines.append(f"  ratio editlab/diffusers = {paired:.3f} (median of per-round ratios; "
                     f"ratio of medians {timings['editlab'].median / timings['diffusers'].median:.3f})")
    return "\n".join(lines)
