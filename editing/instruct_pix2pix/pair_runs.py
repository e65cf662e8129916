"""make-pairs across processes, resumable at any moment: how the caption pairs are split and recorded.

Work is cut so that the result never depends on how it was run:

- A *unit* is the caption pairs rendered together, u = max(1, ⌊batch / samples⌋) consecutive ones: unit j
  holds caption pairs [j·u, (j+1)·u). Their (caption pair, draw) items are batched only with each other, so
  every image's bits depend on the unit alone, not on which process rendered it or when.
- A *shard* is S consecutive units (``--shard-size`` caption pairs, rounded to units). Shard c belongs to rank
  c mod P (torchrun ranks, any number of processes and nodes; one process takes them all).
- Progress of shard c is a journal, OUT/.progress/shard-c.jsonl: one JSON line per finished unit (its
  samples, scores and kept pairs), appended only after the unit's images are written (each atomically). A
  killed run leaves at most a cut-off last line, which is dropped on resume, and the unit is rendered
  again: recorded units are never redone and nothing recorded is lost.
- ``--format webdataset``: a shard's kept images wait in OUT/.progress/shard-c/ until its last unit is
  recorded, then go into OUT/pairs-c.tar in one atomic write (a shard is whole or absent) and the staging
  folder is removed. ``--format folder``: images go straight to OUT/NNNNNNN/SEED_ROW.png.
- When every shard's journal is complete, whichever process sees it first writes OUT/pairs.jsonl and
  OUT/samples.jsonl (atomically; the same content from any process), so the finished folder is the same
  whatever the number of processes, interruptions and resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ldm.files import atomic_path
from ldm.shards import shard_name, write_shard

PROGRESS = ".progress"


def unit_size(batch: int, samples: int) -> int:
    return max(1, batch // samples)


class PairRun:
    """The bookkeeping of one make-pairs output folder (module docstring)."""

    def __init__(self, out: Path, captions: int, batch: int, samples: int, shard_size: int, fmt: str):
        self.out, self.fmt, self.captions = out, fmt, captions
        self.unit = unit_size(batch, samples)
        self.units = -(-captions // self.unit)  # ⌈N / u⌉
        self.units_per_shard = max(1, shard_size // self.unit)
        self.shards = -(-self.units // self.units_per_shard)
        self.progress = out / PROGRESS

    # ---------------------------------------------------------------- layout
    def shard_units(self, shard: int) -> range:
        return range(shard * self.units_per_shard, min((shard + 1) * self.units_per_shard, self.units))

    def unit_captions(self, unit: int) -> range:
        return range(unit * self.unit, min((unit + 1) * self.unit, self.captions))

    def my_shards(self, rank: int, processes: int) -> list[int]:
        return list(range(rank, self.shards, processes))

    def journal(self, shard: int) -> Path:
        return self.progress / f"shard-{shard:06d}.jsonl"

    def staging(self, shard: int) -> Path:
        return self.progress / f"shard-{shard:06d}"

    def tar(self, shard: int) -> Path:
        return self.out / shard_name("pairs", shard)

    def image_path(self, shard: int, index: int, seed: int, row: int) -> tuple[Path, str]:
        """(file to write, name recorded in pairs.jsonl)."""
        name = f"{index:07d}/{seed}_{row}.png"
        return (self.staging(shard) / name if self.fmt == "webdataset" else self.out / name), name

    # ------------------------------------------------------------- journals
    def recorded(self, shard: int) -> dict[int, dict]:
        """unit -> its journal entry; a cut-off or unreadable last line (a kill mid-append) is dropped, and
        the journal is rewritten without it so appends continue from a clean end."""
        path, entries = self.journal(shard), {}
        if not path.is_file():
            return entries
        text = path.read_text()
        lines = text.split("\n")
        good = []
        for line in lines[:-1]:  # the text after the last newline was never completed
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            entries[entry["unit"]] = entry
            good.append(line)
        if len(good) != len(lines) - 1 or lines[-1]:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in good))
        return entries

    def record(self, shard: int, entry: dict) -> None:
        """Append one finished unit (its images are already written)."""
        self.progress.mkdir(parents=True, exist_ok=True)
        with open(self.journal(shard), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def shard_complete(self, shard: int) -> bool:
        return len(self.recorded(shard)) == len(self.shard_units(shard))

    def finish_shard(self, shard: int, entries: dict[int, dict]) -> None:
        """webdataset: pack the staged images of a complete shard into its tar, then drop the staging folder."""
        if self.fmt != "webdataset":
            return
        if not self.tar(shard).is_file():
            write_shard(self.tar(shard), self._samples(shard, entries))
        shutil.rmtree(self.staging(shard), ignore_errors=True)

    def _samples(self, shard: int, entries: dict[int, dict]):
        for unit in sorted(entries):
            for pair in entries[unit]["pairs"]:
                before = (self.staging(shard) / pair["before"]).read_bytes()
                after = (self.staging(shard) / pair["after"]).read_bytes()
                info = {k: v for k, v in pair.items() if k not in ("before", "after")}
                yield pair_key(pair), {"before.png": before, "after.png": after,
                                       "txt": pair["instruction"].encode(), "json": json.dumps(info).encode()}

    # ----------------------------------------------------------------- index
    def write_index(self) -> tuple[list[dict], list[dict]] | None:
        """pairs.jsonl and samples.jsonl once every shard is complete (else None)."""
        entries = []
        for shard in range(self.shards):
            recorded = self.recorded(shard)
            if len(recorded) != len(self.shard_units(shard)):
                return None
            entries += [(shard, recorded[unit]) for unit in sorted(recorded)]
        pairs, samples = [], []
        for shard, entry in entries:
            samples += entry["samples"]
            for pair in entry["pairs"]:
                if self.fmt == "webdataset":
                    pair = {"shard": self.tar(shard).name, "key": pair_key(pair),
                            **{k: v for k, v in pair.items() if k not in ("before", "after")}}
                pairs.append(pair)
        for name, rows in (("pairs.jsonl", pairs), ("samples.jsonl", samples)):
            with atomic_path(self.out / name) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return pairs, samples


def pair_key(pair: dict) -> str:
    return f"{pair['caption_index']:07d}_{pair['seed']}"
