"""Results files: one JSON object per (case, method, setting) row, written as soon as the row is done.

Each process appends to its own ``rows/rank-K.jsonl`` and flushes + fsyncs every row, so a kill loses at most
the row in progress (a half-written last line is dropped on the next start). ``merge`` gathers every rank's
rows, keeps the plan's order, and writes ``results.jsonl`` and ``results.csv`` atomically: the same plan
gives the same bytes, however many processes made it and however often it was resumed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ldm.files import atomic_path

ROW_FIELDS = ("case", "kind", "method", "setting", "seed", "status", "reason", "image")


def rank_file(out: Path, rank: int) -> Path:
    return Path(out) / "rows" / f"rank-{rank}.jsonl"


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The complete rows of one file; a last line cut short by a kill is dropped (and cut off when ``repair``)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for number, line in enumerate(complete.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON row; the results folder is damaged — "
                                 "delete that line or use another --out") from None
    return rows


def finished_keys(out: Path) -> set[str]:
    keys = {row["key"] for path in sorted((Path(out) / "rows").glob("rank-*.jsonl")) for row in read_rows(path)}
    keys |= {row["key"] for row in read_rows(Path(out) / "results.jsonl")}
    return keys


class RowWriter:
    def __init__(self, out: Path, rank: int):
        self.path = rank_file(out, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        read_rows(self.path, repair=True)
        self.file = open(self.path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def all_rows(out: Path) -> dict[str, dict]:
    rows = {row["key"]: row for row in read_rows(Path(out) / "results.jsonl")}
    for path in sorted((Path(out) / "rows").glob("rank-*.jsonl")):
        rows.update({row["key"]: row for row in read_rows(path)})
    return rows


def merge(out: Path, order: list[str]) -> list[dict]:
    """Write results.jsonl and results.csv: rows of ``order`` first (in that order), then rows of earlier
    plans found in the folder (sorted by key)."""
    rows = all_rows(out)
    keys = [k for k in order if k in rows] + sorted(set(rows) - set(order))
    ordered = [rows[k] for k in keys]
    with atomic_path(Path(out) / "results.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in ordered))
    with atomic_path(Path(out) / "results.csv") as tmp:
        tmp.write_text(to_csv(ordered))
    return ordered


def to_csv(rows: list[dict]) -> str:
    """One line per row: the row fields, every parameter (param.NAME) and every metric (its name)."""
    params = sorted({p for row in rows for p in row.get("params", {})})
    metrics = sorted({m for row in rows for m in row.get("metrics", {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(ROW_FIELDS) + [f"param.{p}" for p in params] + metrics)
    for row in rows:
        fields = [row.get(f, "") if f != "setting" else json.dumps(row.get(f, {}), sort_keys=True) for f in ROW_FIELDS]
        writer.writerow(fields + [row.get("params", {}).get(p, "") for p in params] +
                        [repr(row["metrics"][m]) if m in row.get("metrics", {}) else "" for m in metrics])
    return buffer.getvalue()
