"""editlab bench p2p: every phase of the edit runs, each contender is timed in alternation, and too few steps
for a phase is a clear error. (The numbers at a tiny config mean nothing; only the script is checked.)"""

import re

import pytest
import torch

from editing.bench.gpu import build
from editing.bench.p2p import phases
from editing.cli import main


def test_phases_follow_the_notebook_windows():
    model = build("tiny-sd1", torch.float32, torch.device("cpu"))
    # cross-attention replaced in ⌊0.8·N⌋ steps, self-attention in ⌊0.4·N⌋ (P2PConfig's defaults)
    assert phases(model, 16, 5) == {"cross + self": [0, 1], "cross only": [2, 3], "store + blend": [4]}
    assert phases(model, 16, 10) == {"cross + self": [0, 1, 2, 3], "cross only": [4, 5, 6, 7],
                                     "store + blend": [8, 9]}
    with pytest.raises(ValueError, match=r"cross \+ self phase.*use --steps 5"):
        phases(model, 16, 2)  # ⌊0.4·2⌋ = 0: no self-attention step


@pytest.mark.filterwarnings("ignore")
def test_bench_reports_every_phase_and_both_ratios(capsys):
    assert main(["bench", "p2p", "--preset", "tiny-sd1", "--size", "16", "--steps", "5", "--repeats", "2",
                 "--warmup", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "5 ddim steps" in out and "kinds ['cross']" in out  # only cross-attention leaves the fused kernel
    for what in ("time", "CPU time"):  # wall time, and the CPU time other jobs disturb least
        for name in ("p2p", "plain"):
            runs = re.search(rf"{name}\s+{what} median ([\d.]+) s, min ([\d.]+) s per run of 5 steps "
                             rf"\(2 runs: ([\d.]+), ([\d.]+)\)", out)
            assert runs, out
            median, fastest, *seconds = map(float, runs.groups())
            assert fastest == pytest.approx(min(seconds), abs=1e-3)
            assert median == pytest.approx(sum(seconds) / 2, abs=1e-3)
        ratios = re.search(rf"\n  {what} ratio p2p/plain: of medians ([\d.]+), of minimums ([\d.]+), "
                           r"median of per-round ratios ([\d.]+)", out)
        assert ratios and all(float(r) > 0 for r in ratios.groups()), out
    phase_lines = re.findall(r"(cross \+ self|cross only|store \+ blend)\s+(steps? [\d-]+) \((\d+) layers explicit, "
                             r"(\d+) with self-attention replaced\): UNet call median .*; CPU p2p [\d.]+ s", out)
    assert [(p, span) for p, span, *_ in phase_lines] == [("cross + self", "steps 0-1"), ("cross only", "steps 2-3"),
                                                          ("store + blend", "step 4")]
    explicit = [int(n) for _, _, n, _ in phase_lines]
    replaced = [int(n) for *_, n in phase_lines]
    assert explicit[0] == explicit[1] > explicit[2] > 0  # all cross layers while edited, then the stored ones
    assert replaced[0] > 0 and replaced[1] == replaced[2] == 0
    # every timed run reported its 5 UNet calls (progress on stderr): 2 rounds × 2 contenders
    assert len(re.findall(r"UNet calls \(wall, cpu\)( [\d.]+,[\d.]+){5} s", captured.err)) == 4


def test_too_few_steps_is_a_one_line_error(capsys):
    assert main(["bench", "p2p", "--preset", "tiny-sd1", "--size", "16", "--steps", "2", "--repeats", "1",
                 "--device", "cpu"]) == 2
    assert "use --steps 5 or more" in capsys.readouterr().err
