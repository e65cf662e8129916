"""bench p2p: a 2-prompt Prompt-to-Prompt edit beside the plain generation of the same two images.

Both runs make the same UNet calls (N steps × batch 4: [∅, ∅, P_0, P_1]), so the ratio measures what the
controller adds: the explicit, query-chunked attention in the cross-attention layers it edits or stores
(self-attention replacement stays on the fused kernel), the edits, the store and the local blend. Targets
at SD 1.5 shapes on a GPU (docs/performance.md §2, §1): ≤ 1.3× time, ≤ 1.2× peak memory. Timed in
alternation in one run (editing/bench/__init__.py). Peak memory: on a GPU from the allocator; on the CPU
(``--cpu-memory``) the peak resident set of each run in a fresh process (memory.py), which needs only a
step or two (``--steps 2``) to show the peak.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldm.config import PRESETS
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, text_to_image

from . import machine_description, time_alternating
from .memory import resident_peak

SOURCE, TARGET = "a red circle on a blue background", "a red square on a blue background"


def contenders(preset: str, size: int, steps: int, dtype: torch.dtype, device: torch.device,
               scheduler: str = "ddim") -> dict[str, Callable[[], object]]:
    """The two runs on one randomly initialised model: {"p2p": the edit, "plain": the two generations}."""
    from editing.p2p.edit import P2PConfig, prompt_to_prompt

    torch.manual_seed(0)
    model = StableDiffusion(PRESETS[preset]()).eval()
    model.to(device)
    model.unet.to(dtype)
    model.text_encoder.to(dtype)
    sampling = SamplingConfig(steps=steps, guidance=7.5, scheduler=scheduler, seed=0, height=size, width=size)
    config = P2PConfig(blend_words=("circle", "square"))  # notebook defaults + a local blend + the map store
    return {"p2p": lambda: prompt_to_prompt(model, SOURCE, TARGET, sampling, config),
            "plain": lambda: text_to_image(model, [SOURCE, TARGET], sampling, progress=False)}


def one_contender(name: str, preset: str, size: int, steps: int, dtype: torch.dtype) -> Callable[[], object]:
    """One CPU contender under inference mode (for the fresh process of memory.resident_peak)."""
    run = contenders(preset, size, steps, dtype, torch.device("cpu"))[name]

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
    lines.append(f"  peak memory ratio p2p/plain = {p2p.peak_bytes / plain.peak_bytes:.3f} (target <= 1.2); "
                 f"working memory ratio {p2p.working_bytes / max(1, plain.working_bytes):.3f}")
    return lines


def run(preset: str, size: int, steps: int, dtype: torch.dtype, device: torch.device, repeats: int,
        warmup: int, scheduler: str = "ddim", cpu_memory: bool = False) -> str:
    runs = contenders(preset, size, steps, dtype, device, scheduler)
    with torch.inference_mode():
        timings = time_alternating(runs, repeats, warmup, device)
        explicit = runs["p2p"]().controller.explicit_per_step
    p2p, base = timings["p2p"], timings["plain"]
    lines = [f"Prompt-to-Prompt, 2 prompts, preset {preset}, {size}x{size}, {steps} {scheduler} steps, CFG batch 4, "
             f"{dtype}, {device} ({machine_description(device)})",
             f"  explicit attention layers per step: {sum(map(len, explicit)) / len(explicit):.1f} on average "
             f"(first step {len(explicit[0])}, last {len(explicit[-1])}); both runs make {steps} UNet calls "
             f"of batch 4 ({4 * steps} forward-equivalents)"]
    for t in (p2p, base):
        memory = f", peak {t.peak_bytes / 2**20:.0f} MiB" if t.peak_bytes else ""
        lines.append(f"  {t.name:6s} {t.median:.4f} s per edit, {t.median / steps * 1e3:.2f} ms per step "
                     f"(median of {len(t.seconds)}){memory}")
    lines.append(f"  time ratio p2p/plain = {p2p.median / base.median:.3f} (target <= 1.3 at SD 1.5 shapes, GPU)")
    if p2p.peak_bytes and base.peak_bytes:
        lines.append(f"  peak memory ratio p2p/plain = {p2p.peak_bytes / base.peak_bytes:.3f} (target <= 1.2)")
    if cpu_memory and device.type == "cpu":
        lines += cpu_memory_lines(preset, size, steps, dtype)
    return "\n".join(lines)
