"""Running a plan: each process takes its share of the rows, skips the finished ones, scores the rest and
appends them; rank 0 merges when every process is done.

Sharding: under torchrun (RANK / WORLD_SIZE in the environment) process k takes rows k, k + W, k + 2W, …
of the plan and the processes meet at a gloo barrier before rank 0 merges. Every row is seeded with the run's
seed alone (the same noise for every case, as PIE-Bench's per-image seed), so a row's numbers do not depend
on which process ran it or what ran before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from ldm.files import atomic_path
from ldm.images import to_pil

from .methods import CannotRun
from .results import RowWriter, finished_keys, merge

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def save_image(path: Path, image: torch.Tensor) -> None:
    """Lossless PNG, written atomically (a JPEG would change what the metrics saw)."""
    if not path.exists():
        with atomic_path(path) as tmp:
            to_pil(image).save(tmp, format="PNG")


def image_name(case_id: str, key: str, method: str) -> str:
    return f"images/{case_id}/{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.png"


def run_row(case, setting, key: str, seed: int, suite, resources, out: Path) -> dict:
    row = {"key": key, "case": case.id, "kind": case.kind, "method": setting.method.name,
           "setting": setting.overrides, "params": dataclasses.asdict(setting.params), "seed": seed,
           "metrics": {}, "not_computed": {}, "status": "ok", "reason": "", "image": ""}
    torch.manual_seed(seed)
    try:
        output = setting.method.run(resources, case, setting.params, seed)
    except CannotRun as err:
        row.update(status="cannot-run", reason=str(err))
        return row
    row["metrics"], row["not_computed"] = suite.score(case, output)
    row["image"] = image_name(case.id, key, setting.method.name)
    save_image(out / row["image"], output.image)
    return row


def run_plan(rows: list, seed: int, suite, resources, out: Path) -> list[dict] | None:
    """Run this process's share of ``rows`` [(case, setting, key)]; rank 0 merges and returns the merged rows."""
    rank, size = world()
    distributed = size > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        done = finished_keys(out)
        mine = [r for index, r in enumerate(rows) if index % size == rank]
        todo = [r for r in mine if r[2] not in done]
        log.info(f"rank {rank}/{size}: {len(mine)} rows, {len(mine) - len(todo)} already finished, {len(todo)} to run")
        writer = RowWriter(out, rank)
        try:
            for number, (case, setting, key) in enumerate(todo, 1):
                for image, name in ((case.image, "source"), (case.target, "target")):
                    if image is not None:
                        save_image(out / "images" / case.id / f"{name}.png", image)
                try:
                    row = run_row(case, setting, key, seed, suite, resources, out)
                except (ValueError, RuntimeError) as err:  # a bad parameter value for this method, say
                    log.debug(traceback.format_exc())
                    raise ValueError(f"{setting.label} on case {case.id}: {err}") from None
                writer.write(row)
                log.info(f"[{number}/{len(todo)}] {case.id} {setting.label}: {row['status']}"
                         + (f" ({row['reason']})" if row["reason"] else ""))
        finally:
            writer.close()
        if distributed:
            dist.barrier()
        return merge(out, [key for _, _, key in rows]) if rank == 0 else None
    finally:
        if distributed:
            dist.destroy_process_group()
