"""Evaluation and ablations: score every editing method on the same cases, sweep its knobs, draw the trade-offs.

- cases.py: ``EditCase``, what every benchmark yields (source image, prompts, instruction, edited words, edit
  mask, and where known the exact target image and the toy attributes of both scenes)
- benchmarks/: ``toy-edits`` (procedural, exact ground truth), PIE-Bench's on-disk format, MagicBrush-style folders
- metrics/: pixel metrics under a mask, LPIPS, DINO structure distance, CLIP scores, the toy readers, condition fidelity
- methods/: one adapter per method, from a case and its parameters to an edited image
- sweeps.py, results.py: the plan (cases × methods × settings), resumable and sharded results files
- report.py, plots.py: mean and 95% bootstrap interval per method and setting, trade-off plots, image grids
The command is ``editlab eval`` (editing/commands/eval.py); docs/evaluation.md explains every metric.
"""
