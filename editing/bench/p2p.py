"""bench p2p: a 2-prompt Prompt-to-Prompt edit beside the plain generation of the same two images.

Both runs make the same UNet calls (N steps × batch 4: [∅, ∅, P_0, P_1]) on one model set up as
``StableDiffusion.load`` sets it up, so the ratio measures what the controller adds: the explicit,
query-chunked attention in the cross-attention layers it edits or stores (self-attention replacement stays
on the fused kernel), the edits, the store and the local blend. Targets at SD 1.5 shapes: ≤ 1.05× time and
memory on the CPU, ≤ 1.3× time and ≤ 1.2× peak memory on a GPU (docs/performance.md §2).

The edit uses the Prompt-to-Prompt notebook's windows (``P2PConfig``: cross-attention replaced for the first
80% of the steps, self-attention for the first 40%) plus a local blend and the map store, so a run has three
phases: both windows, cross-attention only, and neither (store and blend only). ``phases`` checks that N gives
each phase at least one step (N ≥ 3; N = 5 gives the fractions exactly: 4 and 2 of 5 steps).

Timing on a shared machine (docs/performance.md §3): one warm-up of each contender at one step (kernels and
their primitives for every shape), then ``repeats`` rounds that alternate the two (A B, B A, ...). Reported:
median and minimum of each, the ratio of medians, of minimums and the median of per-round ratios, and the
UNet call times of each phase (every call is timed). Peak memory: on a GPU from the allocator; on the CPU
(``--cpu-memory``) the peak resident set of each run in a fresh process (memory.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

import torch

from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, text_to_image

from . import Timing, machine_description, time_alternating
from .gpu import build
from .memory import resident_peak

SOURCE, TARGET = "a red circle on a blue background", "a red square on a blue background"


def edit_config():
    from editing.p2p.edit import P2PConfig

    return P2PConfig(blend_words=("circle", "square"))  # notebook windows + a local blend + the map store


def phases(model: StableDiffusion, size: int, steps: int) -> dict[str, list[int]]:
    """The steps of each phase of the edit: {"cross + self": ..., "cross only": ..., "store + blend": ...};
    a clear error where ``steps`` leaves a phase empty."""
    from editing.p2p.edit import build_controller

    f = model.config.vae.downsample_factor
    controller = build_controller(model, [SOURCE, TARGET], steps, (size // f, size // f), edit_config())
    cross = [i for i in range(steps) if controller.cross_active[i]]
    both = [i for i in cross if i in controller.self_calls]
    found = {"cross + self": both, "cross only": [i for i in cross if i not in both],
             "store + blend": [i for i in range(steps) if i not in cross and i not in controller.self_calls]}
    empty = [name for name, where in found.items() if not where]
    if empty:
        raise ValueError(f"{steps} steps leave the {' and '.join(empty)} phase(s) of the edit empty "
                         f"(cross-attention replaced in {len(cross)} steps, self-attention in "
                         f"{len(controller.self_calls)}); use --steps 5 or more (5 gives the defaults' 0.8 and 0.4)")
    return found


def contenders(model: StableDiffusion, size: int, steps: int,
               scheduler: str = "ddim") -> dict[str, Callable[[], object]]:
    """The two runs: {"p2p": the edit, "plain": the two generations}."""
    from editing.p2p.edit import prompt_to_prompt

    sampling = SamplingConfig(steps=steps, guidance=7.5, scheduler=scheduler, seed=0, height=size, width=size)
    return {"p2p": lambda: prompt_to_prompt(model, SOURCE, TARGET, sampling, edit_config()),
            "plain": lambda: text_to_image(model, [SOURCE, TARGET], sampling, progress=False)}


def one_contender(name: str, preset: str, size: int, steps: int, dtype: torch.dtype) -> Callable[[], object]:
    """One CPU contender under inference mode (for the fresh process of memory.resident_peak)."""
    run = contenders(build(preset, dtype, torch.device("cpu")), size, steps)[name]

    def measured():
        with torch.inference_mode():
            return run()

    return measured


def cpu_memory_lines(preset: str, size: int, steps: int, dtype: torch.dtype) -> list[str]:
    """Peak resident memory of each contender, each in a fresh process (memory.py)."""
    peaks = {name: resident_peak(name, one_contender, (name, preset, size, steps, dtype), torch.get_num_threads())
             for name in ("p2p", "plain")}
    lines = [f"  {p.name:6s} peak resident {p.peak_bytes / 2**20:.0f} MiB (weights included; "
             f"{p.working_bytes / 2**20:.0f} MiB above the built model)" for p in peaks.values()]
    p2p, plain = peaks["p2p"], peaks["plain"]
    lines.append(f"  peak memory ratio p2p/plain = {p2p.peak_bytes / plain.peak_bytes:.3f} (target <= 1.05 on the CPU);"
                 f" working memory ratio {p2p.working_bytes / max(1, plain.working_bytes):.3f}")
    return lines


class CallTimer:
    """Wall and CPU seconds of every UNet call, per run: ``runs[k][i]`` is (wall, cpu) of call i of run k."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.runs: list[list[tuple[float, float]]] = []
        self.device, self._start = device, (0.0, 0.0)
        unet.register_forward_pre_hook(lambda *_: self._begin())
        unet.register_forward_hook(lambda *_: self._end())

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _begin(self):
        self._sync()
        self._start = (time.perf_counter(), time.process_time())

    def _end(self):
        self._sync()
        if self.runs:  # the warm-up runs are not timed
            self.runs[-1].append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    def timed(self, name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            self.runs.append([])
            result = fn()
            print(f"  {name}: UNet calls (wall, cpu) " + " ".join(f"{w:.2f},{c:.2f}" for w, c in self.runs[-1])
                  + " s", file=sys.stderr, flush=True)  # progress of a long run
            return result
        return run


def _timing_lines(p2p: Timing, plain: Timing, steps: int, cpu: bool) -> list[str]:
    lines = []
    for what, of in (("time", lambda t: t.seconds), ("CPU time", lambda t: t.cpu_seconds))[:1 + cpu]:
        for t in (p2p, plain):
            seconds = of(t)
            lines.append(f"  {t.name:6s} {what} median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s "
                         f"per run of {steps} steps ({len(seconds)} runs: "
                         + ", ".join(f"{s:.3f}" for s in seconds) + ")")
        a, b = of(p2p), of(plain)
        per_round = statistics.median(x / y for x, y in zip(a, b))
        lines.append(f"  {what} ratio p2p/plain: of medians {statistics.median(a) / statistics.median(b):.3f}, of "
                     f"minimums {min(a) / min(b):.3f}, median of per-round ratios {per_round:.3f} "
                     f"(targets: <= 1.05 on the CPU, <= 1.3 on a GPU)")
    return lines


def _phase_lines(calls: dict[str, list[list[tuple[float, float]]]], found: dict[str, list[int]], explicit, replaced,
                 cpu: bool) -> list[str]:
    lines = []
    for phase, where in found.items():
        per = {(name, k): statistics.median(run[i][k] for run in runs for i in where)
               for name, runs in calls.items() for k in (0, 1)}
        layers = f"{len(explicit[where[0]])} layers explicit, {len(replaced[where[0]])} with self-attention replaced"
        span = f"step {where[0]}" if len(where) == 1 else f"steps {where[0]}-{where[-1]}"
        line = (f"  {phase:13s} {span} ({layers}): UNet call median p2p {per['p2p', 0]:.3f} s, "
                f"plain {per['plain', 0]:.3f} s, ratio {per['p2p', 0] / per['plain', 0]:.3f}")
        if cpu:
            line += (f"; CPU p2p {per['p2p', 1]:.3f} s, plain {per['plain', 1]:.3f} s, "
                     f"ratio {per['p2p', 1] / per['plain', 1]:.3f}")
        lines.append(line)
    return lines


def run(preset: str, size: int, steps: int, dtype: torch.dtype, device: torch.device, repeats: int,
        warmup: int, scheduler: str = "ddim", cpu_memory: bool = False) -> str:
    model = build(preset, dtype, device)
    found = phases(model, size, steps)
    lines = [f"Prompt-to-Prompt, 2 prompts, preset {preset}, {size}x{size}, {steps} {scheduler} steps, CFG batch 4, "
             f"{dtype}, {device} ({machine_description(device)}); both runs make {steps} UNet calls of batch 4"]
    if repeats > 0:
        timer, results = CallTimer(model.unet, device), []
        runs = {name: timer.timed(name, fn) for name, fn in contenders(model, size, steps, scheduler).items()}
        keep = runs["p2p"]
        runs["p2p"] = lambda: results.append(keep())
        load_before = os.getloadavg()
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in contenders(model, size, 1, scheduler).values():
                    fn()
            timer.runs.clear()
            timings = time_alternating(runs, repeats, 0, device)
        load_after = os.getloadavg()
        order = [name for k in range(repeats) for name in (list(runs) if k % 2 == 0 else list(runs)[::-1])]
        calls = {name: [c for c, who in zip(timer.runs, order) if who == name] for name in runs}
        controller = results[-1].controller
        explicit, replaced = controller.explicit_per_step, controller.replaced_per_step
        kinds = {name.rsplit(".", 1)[-1] for step in explicit for name in step}
        lines.append(f"  explicit attention path: {sum(map(len, explicit)) / steps:.1f} layers per step on average, "
                     f"kinds {sorted(kinds)}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
        cpu = device.type == "cpu"  # the CPU time of a single-threaded run is what other jobs disturb least
        lines += _timing_lines(timings["p2p"], timings["plain"], steps, cpu)
        lines += _phase_lines(calls, found, explicit, replaced, cpu)
        for t in (timings["p2p"], timings["plain"]):
            if t.peak_bytes:
                lines.append(f"  {t.name:6s} peak {t.peak_bytes / 2**20:.0f} MiB")
        if timings["p2p"].peak_bytes and timings["plain"].peak_bytes:
            ratio = timings["p2p"].peak_bytes / timings["plain"].peak_bytes
            lines.append(f"  peak memory ratio p2p/plain = {ratio:.3f}"
                         " (target <= 1.2 on a GPU)")
    if cpu_memory and device.type == "cpu":
        del model  # the fresh processes build their own
        lines += cpu_memory_lines(preset, size, steps, dtype)
    return "\n".join(lines)
