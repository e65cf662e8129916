"""Condition fidelity of ControlNet outputs, as ControlNet++ (Li et al., ECCV 2024) scores it: detect the
condition again on the output and compare it with the condition the output was made from.

Canny: F1 of the binary edge maps, flattened, F1 = 2·TP / (2·TP + FP + FN), as torchmetrics' BinaryF1Score
(0 when neither map has an edge pixel, its zero_division default).
"""

from __future__ import annotations

import torch

from controls.canny import CannyConfig, canny


def binary_f1(predicted: torch.Tensor, target: torch.Tensor) -> float:
    predicted, target = predicted.bool().flatten(), target.bool().flatten()
    tp = int((predicted & target).sum())
    fp, fn = int((predicted & ~target).sum()), int((~predicted & target).sum())
    return 0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def canny_f1(output: torch.Tensor, hint_edges: torch.Tensor, config: CannyConfig | None = None) -> float:
    """F1 of the output's Canny edges against the hint's edges (bool [H, W]), found by the same detector
    (``config``: the hint's; default thresholds when None)."""
    return binary_f1(canny(output.float(), config or CannyConfig()), hint_edges)
