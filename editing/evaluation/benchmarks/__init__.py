"""Benchmarks: where the cases come from. ``load_benchmark(name, ...)`` returns a list of ``EditCase``.

- ``toy-edits`` (toy_edits.py): procedural toy-world edits with the exact target image;
- ``pie-bench`` (pie_bench.py): PIE-Bench's ``mapping_file.json`` and ``annotation_images/``;
- ``folder`` (folder.py): MagicBrush-style (source, instruction, ground-truth target) pairs from a folder.
"""

from __future__ import annotations

from pathlib import Path

from .folder import load_folder
from .pie_bench import load_pie_bench
from .toy_edits import KINDS, ToyEdits

BENCHMARKS = ("toy-edits", "pie-bench", "folder")


def load_benchmark(name: str, root: Path | None = None, cases: int | None = None, seed: int = 0,
                   kinds: tuple[str, ...] = KINDS, categories: tuple[str, ...] | None = None) -> list:
    """The first ``cases`` cases of a benchmark (all when None). ``seed`` and ``kinds`` apply to toy-edits,
    ``categories`` (PIE-Bench editing_type_id strings) to pie-bench."""
    if name == "toy-edits":
        if root is not None:
            raise ValueError("toy-edits is generated, it takes no --root")
        return ToyEdits(cases if cases is not None else 200, seed, kinds=kinds).cases()
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if root is None:
        raise ValueError(f"--benchmark {name} needs --root DIR (the benchmark's folder)")
    loaded = load_pie_bench(root, categories) if name == "pie-bench" else load_folder(root)
    return loaded[:cases] if cases is not None else loaded
