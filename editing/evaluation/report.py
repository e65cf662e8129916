"""The report of a results folder: a summary table per method and setting, trade-off plots and image grids.

Each metric's mean over the cases comes with a 95% bootstrap interval: resample the cases with replacement
B = 2000 times (numpy, seed 0), take the 2.5th and 97.5th percentiles of the resampled means. Cases where a
metric is not a number (no background pixels: PIE-Bench's NaN cases) are left out and counted; rows whose
method could not run are counted with their reasons.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.files import atomic_path

from .plots import image_grid, tradeoff_plot
from .results import read_rows

BOOTSTRAP = 2000
HEADLINE = ["bg_psnr", "bg_ssim", "bg_lpips", "structure", "recon_psnr", "target_psnr", "edit_accuracy",
            "edit_success", "kept_accuracy", "object_iou", "clip_whole", "clip_edited", "clip_direction", "clip_image",
            "gt_l1", "gt_clip_i", "gt_dino", "canny_f1", "style_clip_i", "style_clip_t"]
KIND_METRICS = ["bg_psnr", "edit_accuracy", "edit_success", "kept_accuracy", "object_iou", "clip_direction"]
TRADEOFFS = [("edit_accuracy", "bg_psnr"), ("clip_direction", "clip_image"), ("target_psnr", "bg_psnr")]


def bootstrap(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) with the 95% percentile bootstrap interval."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        return math.nan, math.nan, math.nan
    generator = np.random.default_rng(seed)
    means = data[generator.integers(0, len(data), size=(BOOTSTRAP, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def group_rows(rows: list[dict]) -> list[dict]:
    """Groups of rows sharing method and setting, in order of first appearance."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row["method"], json.dumps(row["setting"], sort_keys=True))
        label = " ".join([row["method"]] + [f"{k}={v}" for k, v in row["setting"].items()])
        groups.setdefault(key, {"method": row["method"], "setting": row["setting"], "label": label, "rows": []})
        groups[key]["rows"].append(row)
    return list(groups.values())


def summarise(group: dict) -> dict:
    ok = [r for r in group["rows"] if r["status"] == "ok"]
    names = sorted({m for r in ok for m in r["metrics"]})
    stats = {}
    for name in names:
        values = [r["metrics"][name] for r in ok if name in r["metrics"]]
        excluded = sum(1 for r in ok if r["not_computed"].get(name, "").startswith("NaN"))
        mean, low, high = bootstrap(values)
        stats[name] = {"mean": mean, "low": low, "high": high, "n": len(values), "excluded": excluded}
    reasons = sorted({r["reason"] for r in group["rows"] if r["status"] != "ok"})
    return {**group, "stats": stats, "ran": len(ok), "cannot_run": len(group["rows"]) - len(ok), "reasons": reasons}


def kind_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each setting's trade-off metrics per edit kind, when the rows hold more than one kind
    (a method may edit one kind and not another: the pooled mean hides it)."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r["kind"]))
    metrics = [m for m in KIND_METRICS if any(m in r["metrics"] for r in rows)]
    if len(kinds) < 2 or not metrics:
        return []
    lines = ["Per edit kind:", "", "| method and setting | kind | cases | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for group in group_rows(rows):
        for kind in kinds:
            s = summarise({**group, "rows": [r for r in group["rows"] if r["kind"] == kind]})
            if s["ran"]:
                lines.append(f"| {s['label']} | {kind} | {s['ran']} | "
                             + " | ".join(_cell(s["stats"].get(m)) for m in metrics) + " |")
    return lines + [""]


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.4g} [{stat['low']:.4g}, {stat['high']:.4g}]"


def markdown(summaries: list[dict], plots: list[str], grids: list[str], rows: list[dict]) -> str:
    metrics = [m for m in HEADLINE if any(m in s["stats"] for s in summaries)]
    metrics += sorted({m for s in summaries for m in s["stats"]} - set(metrics))
    lines = ["# Evaluation report", "", f"{len(rows)} rows; mean [95% bootstrap interval] over the cases.", ""]
    for start in range(0, len(metrics), 5):
        chunk = metrics[start:start + 5]
        lines += ["| method and setting | cases | " + " | ".join(chunk) + " |",
                  "|---|---|" + "---|" * len(chunk)]
        for s in summaries:
            lines.append(f"| {s['label']} | {s['ran']} | " + " | ".join(_cell(s["stats"].get(m)) for m in chunk) + " |")
        lines.append("")
    lines += kind_table(rows)
    excluded = [(s["label"], m, st["excluded"]) for s in summaries for m, st in s["stats"].items() if st["excluded"]]
    if excluded:
        lines += ["Cases left out of a mean (the metric is NaN there):", ""]
        lines += [f"- {label}: {metric}, {count} cases" for label, metric, count in excluded] + [""]
    not_computed = sorted({f"{m}: {why}" for r in rows for m, why in r["not_computed"].items()
                           if not why.startswith("NaN")})
    if not_computed:
        lines += ["Not computed:", ""] + [f"- {line}" for line in not_computed] + [""]
    failed = [(s["label"], s["cannot_run"], s["reasons"]) for s in summaries if s["cannot_run"]]
    if failed:
        lines += ["Could not run:", ""]
        lines += [f"- {label}: {n} cases ({'; '.join(reasons)})" for label, n, reasons in failed]
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots + grids]
    return "\n".join(lines) + "\n"


def _point(summary: dict, x: str, y: str):
    sx, sy = summary["stats"].get(x), summary["stats"].get(y)
    if sx is None or sy is None:
        return None
    first = next(iter(summary["setting"].values()), "")  # the first swept parameter runs along the line
    return (sx["mean"], sx["low"], sx["high"], sy["mean"], sy["low"], sy["high"], f"{first}")


def _line(summary: dict) -> str:
    """The series a setting belongs to: its method and every swept parameter but the first."""
    rest = list(summary["setting"].items())[1:]
    return " ".join([summary["method"]] + [f"{k}={v}" for k, v in rest])


def tradeoff_images(summaries: list[dict]) -> dict[str, Image.Image]:
    """One plot per metric pair: a line per method (and value of its other swept parameters) through the
    values of its first swept parameter, in sweep order."""
    out = {}
    for x, y in TRADEOFFS:
        series = []
        for line in dict.fromkeys(_line(s) for s in summaries):
            points = [p for s in summaries if _line(s) == line and (p := _point(s, x, y)) is not None]
            if points:
                series.append({"label": line, "points": points})
        if series:
            out[f"tradeoff-{x}-vs-{y}.png"] = tradeoff_plot(series, x, y, f"{y} against {x} (95% intervals)")
    return out


def grid_images(root: Path, summaries: list[dict], cases: int = 4) -> dict[str, Image.Image]:
    """Per method: the first cases in rows, source | each setting | ground truth in columns."""
    out = {}
    for method in dict.fromkeys(s["method"] for s in summaries):
        groups = [s for s in summaries if s["method"] == method]
        case_ids = list(dict.fromkeys(r["case"] for s in groups for r in s["rows"]))[:cases]
        open_image = lambda rel: Image.open(root / rel) if rel and (root / rel).is_file() else None
        cells = []
        for case in case_ids:
            by_group = [next((r["image"] for r in s["rows"] if r["case"] == case), "") for s in groups]
            cells.append([open_image(f"images/{case}/source.png")] + [open_image(p) for p in by_group] +
                         [open_image(f"images/{case}/target.png")])
        labels = ["source"] + [" ".join(f"{k}={v}" for k, v in s["setting"].items()) or method for s in groups] + \
                 ["ground truth"]
        out[f"grid-{method}.png"] = image_grid(cells, case_ids, labels, f"{method}: cases × settings")
    return out


def write_report(root: Path) -> list[Path]:
    root = Path(root)
    path = root / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results; run 'editlab eval ... --out {root}' first")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: holds no rows")
    summaries = [summarise(g) for g in group_rows(rows)]
    written = []
    pictures = {**tradeoff_images(summaries), **grid_images(root, summaries)}
    for name, picture in pictures.items():
        with atomic_path(root / "report" / name) as tmp:
            picture.save(tmp, format="PNG")
        written.append(root / "report" / name)
    plots = [f"report/{n}" for n in pictures if n.startswith("tradeoff")]
    grids = [f"report/{n}" for n in pictures if n.startswith("grid")]
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(markdown(summaries, plots, grids, rows))
    summary_json = [{"method": s["method"], "setting": s["setting"], "cases": s["ran"], "cannot_run": s["cannot_run"],
                     "stats": s["stats"]} for s in summaries]
    with atomic_path(root / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary_json, indent=1, sort_keys=True) + "\n")
    return [root / "report.md", root / "summary.json"] + written
