"""editing/bench/memory.py: the CPU peak-memory probe behind `editlab bench p2p --cpu-memory`."""

import re

import torch

from editing.bench.memory import resident_peak
from editing.bench.p2p import run as bench_p2p

MIB = 2**20


def allocate(mebibytes: int):
    """A setup returning a run that touches ``mebibytes`` of fresh memory (module level: it is pickled)."""
    def run():
        block = torch.ones(mebibytes * MIB // 4)  # float32: 4 bytes each; ones() writes every page
        return float(block[-1])
    return run


def test_the_probe_sees_a_known_allocation_and_not_the_setup():
    big = resident_peak("big", allocate, (256,), threads=1)
    small = resident_peak("small", allocate, (1,), threads=1)
    assert 250 * MIB <= big.working_bytes <= 300 * MIB, big
    assert small.working_bytes < 32 * MIB, small  # the interpreter and torch are in the baseline, not the peak
    assert big.peak_bytes - small.peak_bytes > 200 * MIB


def test_bench_p2p_reports_cpu_peak_memory_of_both_runs():
    # 3 steps: the fewest that run every phase of the edit; repeats=0: the memory probe alone
    text = bench_p2p("tiny-sd1", 32, 3, torch.float32, torch.device("cpu"), repeats=0, warmup=0, cpu_memory=True)
    peaks = {name: float(re.search(rf"{name} +peak resident (\d+) MiB", text).group(1)) for name in ("p2p", "plain")}
    ratio = float(text.split("peak memory ratio p2p/plain = ")[1].split()[0])
    assert min(peaks.values()) > 100  # MiB: at least the interpreter, torch and the model
    assert abs(ratio - peaks["p2p"] / peaks["plain"]) < 0.01
