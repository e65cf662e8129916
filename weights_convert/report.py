"""Bookkeeping of a conversion and the strict check at its end (docs/checkpoints.md §14).

The rules (``ldm_unet``, ``ldm_vae``, ``ldm_text``, ``diffusers_folder``) fill a ``Mapping``: which source key
went to which target key, which source keys are ignored and why, and which no rule knows. ``assemble`` then
compares the mapping with the parameters the target model actually has and returns a ``ConversionReport``
with four groups -- missing, unexpected, ignored (with the reason) and shape mismatches -- raising a one-line
``WeightsError`` unless missing, unexpected and mismatches are all empty.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.model import WeightsError


@dataclass
class Mapping:
    """What a set of rules did with the source tensors. Every source key ends up in exactly one of
    ``sources`` (used), ``ignored``, ``unmatched`` or ``duplicates``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # target key -> tensor
    sources: dict[str, str] = field(default_factory=dict)  # target key -> the source key it came from
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why the target does not need it
    unmatched: list[str] = field(default_factory=list)  # source keys that no rule knows
    duplicates: dict[str, str] = field(default_factory=dict)  # source key -> target it would have filled twice

    def add(self, source_key: str, target_key: str, tensor: torch.Tensor) -> None:
        if target_key in self.tensors:
            self.duplicates[source_key] = target_key
            return
        self.tensors[target_key] = tensor
        self.sources[target_key] = source_key

    def ignore(self, source_key: str, reason: str) -> None:
        self.ignored[source_key] = reason

    def unknown(self, source_key: str) -> None:
        self.unmatched.append(source_key)

    def merge(self, other: "Mapping", target_prefix: str = "") -> "Mapping":
        """Add ``other``'s assignments with ``target_prefix`` put before each target key."""
        for target_key, tensor in other.tensors.items():
            self.add(other.sources[target_key], target_prefix + target_key, tensor)
        self.ignored.update(other.ignored)
        self.unmatched.extend(other.unmatched)
        self.duplicates.update({s: target_prefix + t for s, t in other.duplicates.items()})
        return self

    def drop_targets(self, target_prefix: str, reason: str) -> None:
        """Forget every target under ``target_prefix``; their source keys become ignored with ``reason``."""
        for target_key in [k for k in self.tensors if k.startswith(target_prefix)]:
            self.ignore(self.sources.pop(target_key), reason)
            del self.tensors[target_key]


@dataclass
class ConversionReport:
    """The outcome of one conversion, as data. ``info`` says what was decided (layout, family, EMA, ...)."""

    missing: list[str] = field(default_factory=list)  # target parameters nothing filled
    unexpected: list[str] = field(default_factory=list)  # source keys neither used nor on the ignore list
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> documented reason
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # target -> (expected, found)
    filled: int = 0  # target parameters filled
    source: str = ""
    info: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def error_message(self) -> str:
        """One line naming the problem keys (first few of each group, with counts) and the likely fix."""
        mismatches = [f"{k} {list(e)} vs {list(f)}" for k, (e, f) in self.shape_mismatches.items()]
        parts = [f"{name} {_first_few(keys)}" for name, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", mismatches)) if keys]
        what = " ".join(f"{k}={v}" for k, v in self.info.items() if k in ("layout", "family"))
        return (f"{self.source}: weights do not fit the model ({what}): {'; '.join(parts)}; "
                "check --model/--config, or that the file is complete")

    def summary(self) -> str:
        """A few lines for people: what was converted, and the ignored keys grouped by reason."""
        decided = ", ".join(f"{k} {v}" for k, v in self.info.items())
        lines = [f"converted {self.filled} tensors from {self.source} ({decided})"]
        for reason, _ in Counter(self.ignored.values()).most_common():
            examples = [k for k, r in self.ignored.items() if r == reason]
            lines.append(f"  ignored {_first_few(examples, 2)}: {reason}")
        lines.append(f"  missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                     f"wrong shape {len(self.shape_mismatches)}")
        return "\n".join(lines)


def _first_few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > n else ''}]"


def expected_shapes(target: nn.Module | dict[str, torch.Size]) -> dict[str, torch.Size]:
    """Parameter shapes of a model (build it on the meta device to avoid allocating anything)."""
    if isinstance(target, nn.Module):
        return {k: v.shape for k, v in target.state_dict().items()}
    return dict(target)


def assemble(mapping: Mapping, target: nn.Module | dict[str, torch.Size], source: str = "",
             info: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Check ``mapping`` against the target's parameters; return the tensors and the report.

    Raises WeightsError (with ``.report`` attached) unless every target parameter is filled exactly once with
    the right shape and every source key is used or ignored.
    """
    expected = expected_shapes(target)
    report = ConversionReport(source=source, info=dict(info or {}), ignored=dict(mapping.ignored))
    report.unexpected = list(mapping.unmatched)
    report.unexpected += [f"{s} (fills {t} twice)" for s, t in mapping.duplicates.items()]
    report.unexpected += [f"{mapping.sources[t]} (as {t})" for t in mapping.tensors if t not in expected]
    report.missing = sorted(set(expected) - set(mapping.tensors))
    for key in expected:
        if key in mapping.tensors and tuple(mapping.tensors[key].shape) != tuple(expected[key]):
            report.shape_mismatches[key] = (tuple(expected[key]), tuple(mapping.tensors[key].shape))
    report.filled = len(set(expected) & set(mapping.tensors)) - len(report.shape_mismatches)
    if not report.ok:
        error = WeightsError(report.error_message())
        error.report = report
        raise error
    return _unshared({k: mapping.tensors[k] for k in expected}), report


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share memory with an earlier one (safetensors refuses to save shared storage)."""
    seen, result = set(), {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result
