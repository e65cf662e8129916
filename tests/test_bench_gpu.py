"""editlab bench gpu: the dry run on the CPU prints every row of the GPU table (the script works in CI)."""

import re

import pytest

from editing.cli import main

ROWS = ("UNet forward, batch 2", "text to image, 2 steps", "Prompt-to-Prompt, 2 prompts", "ControlNet, 2 steps",
        "edit-friendly DDPM, 2 steps")


@pytest.mark.filterwarnings("ignore")
def test_dry_run_prints_the_whole_table(capsys):
    assert main(["bench", "gpu", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert [sum(r.startswith(f"| {what}") for r in rows) for what in ROWS] == [3, 3, 2, 2, 2]
    for row in rows:
        seconds, ratio = row.split(" | ")[2], row.split(" | ")[4]
        assert re.fullmatch(r"\d+\.\d{4}", seconds) and float(seconds) > 0 and float(ratio) > 0, row
    baselines = [r for r in rows if r.split(" | ")[1] in ("diffusers", "plain, 2 images", "plain, 1 image")]
    assert len(baselines) == 5 and all(r.split(" | ")[4] == "1.000" for r in baselines)


def test_without_a_gpu_it_asks_for_the_dry_run(capsys):
    assert main(["bench", "gpu", "--device", "cpu"]) == 2
    assert "add --dry-run" in capsys.readouterr().err
