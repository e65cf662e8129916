"""editlab eval end to end on toy-edits: two methods and a 2-value sweep, deterministic results, resume after
SIGKILL, torchrun with 2 processes, one-line errors, and the report."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from editing.cli import main

RUN = ["eval", "--benchmark", "toy-edits", "--cases", "2", "--method", "sdedit", "--method", "ip2p",
       "--sweep", "sdedit.steps=4", "--sweep", "ip2p.steps=3", "--sweep", "ip2p.image_guidance=1.0,2.0"]
ROWS = 2 * (1 + 2)  # cases × (sdedit + 2 ip2p settings)


def command(out):
    return [sys.executable, "-m", "editing.cli"] + RUN + ["--out", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # one thread, as every other run here (the conftest fixture sets it only after module fixtures run): a
    # different thread count may round differently
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval") / "first"
    try:
        assert main(RUN + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def test_rows_metrics_and_the_same_command_twice_gives_the_same_file(reference, tmp_path):
    rows = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert len(rows) == ROWS
    assert [(r["method"], r["setting"]) for r in rows[:3]] == [
        ("sdedit", {"steps": 4}), ("ip2p", {"steps": 3, "image_guidance": 1.0}),
        ("ip2p", {"steps": 3, "image_guidance": 2.0})]
    for row in rows:
        assert row["status"] == "ok" and (reference / row["image"]).is_file()
        assert {"bg_psnr", "bg_ssim", "target_psnr", "kept_accuracy", "object_iou"} <= set(row["metrics"])
        assert "needs --lpips" in row["not_computed"]["bg_lpips"]  # missing weights: named, not zero
    assert (reference / "results.csv").read_text().count("\n") == ROWS + 1
    assert main(RUN + ["--out", str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def test_sigkill_then_rerun_finishes_without_redoing_rows(reference, tmp_path, caplog):
    out = tmp_path / "killed"
    rank_file = out / "rows" / "rank-0.jsonl"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and (not rank_file.is_file() or rank_file.read_text().count("\n") < 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = rank_file.read_text()
    finished = before.count("\n")
    assert 2 <= finished < ROWS, "the run was killed before or after the rows it should have left"
    caplog.set_level(logging.INFO)
    assert main(RUN + ["--out", str(out)]) == 0
    assert f"{finished} already finished, {ROWS - finished} to run" in caplog.text
    assert rank_file.read_text().startswith(before[:before.rfind("\n") + 1])  # finished rows kept as written
    assert (out / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def test_torchrun_with_two_processes_gives_the_same_rows(reference, tmp_path):
    out = tmp_path / "sharded"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "editing.cli"] + RUN + ["--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((out / "rows" / "rank-1.jsonl").read_text().splitlines()) == ROWS // 2
    assert (out / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--method", "magic"], "unknown method 'magic'"),
    (["--sweep", "ip2p.strength=1,2"], "method ip2p has no parameter 'strength'"),
    (["--sweep", "ip2p.steps=many"], "expected a int"),
    (["--dino", "missing-dino.pth"], "--dino missing-dino.pth: no such file"),
])
def test_bad_input_is_one_line_and_keeps_the_rows(reference, tmp_path, capsys, extra, message):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "results.jsonl").write_bytes((reference / "results.jsonl").read_bytes())
    assert main(RUN + ["--out", str(out)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (out / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()


def test_missing_or_malformed_benchmark_file_is_one_line(tmp_path, capsys):
    args = ["eval", "--benchmark", "pie-bench", "--method", "sdedit", "--out", str(tmp_path / "o")]
    assert main(args + ["--root", str(tmp_path)]) == 2
    assert "mapping_file.json: not found" in capsys.readouterr().err
    (tmp_path / "mapping_file.json").write_text("[1, 2")
    assert main(args + ["--root", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_report_summarises_each_setting_with_intervals_plots_and_grids(reference):
    assert main(["eval", "--report", str(reference)]) == 0
    summary = json.loads((reference / "summary.json").read_text())
    rows = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert [(s["method"], s["setting"]) for s in summary] == [(r["method"], r["setting"]) for r in rows[:3]]
    stat = summary[1]["stats"]["bg_psnr"]
    values = [r["metrics"]["bg_psnr"] for r in rows if r["setting"] == summary[1]["setting"]]
    assert stat["mean"] == pytest.approx(sum(values) / len(values)) and stat["low"] <= stat["mean"] <= stat["high"]
    report = (reference / "report.md").read_text()
    assert "| ip2p image_guidance=2.0 steps=3 | 2 | " in report and "| sdedit steps=4 | 2 | " in report
    # per edit kind: the two cases are a colour and a shape edit, one row each per setting
    colour = [r for r in rows if r["kind"] == "colour" and r["method"] == "sdedit"][0]["metrics"]
    assert f"| sdedit steps=4 | colour | 1 | {colour['bg_psnr']:.4g} [{colour['bg_psnr']:.4g}, " in report
    assert all(r["metrics"]["edit_success"] <= r["metrics"]["edit_accuracy"] for r in rows)
    for name in ("grid-ip2p.png", "grid-sdedit.png", "tradeoff-edit_accuracy-vs-bg_psnr.png"):
        assert (reference / "report" / name).stat().st_size > 1000
