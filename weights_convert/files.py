"""Reading weight files safely, and telling formats apart by their bytes (docs/checkpoints.md §2).

- safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{"``. Read with
  ``safe_open``: no code runs. Tested first, as the length's first byte can be 0x80.
- torch zip (``.ckpt``, ``.pth``, ``.bin`` since torch 1.6): starts with ``PK``; legacy torch pickles start with
  byte 0x80. Both go through ``torch.load(path, map_location="cpu", weights_only=True)`` and nothing else: a
  file that the restricted unpickler refuses is refused here too, never retried with ``weights_only=False``.
- Training checkpoints are dicts with a ``state_dict`` entry (plus ``global_step``, ``epoch``, ...); the
  tensors are taken from ``state_dict``.

The file extension is never trusted; a PNG renamed ``.ckpt`` is reported as a PNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.model import WeightsError

log = logging.getLogger(__name__)

# First bytes of files people pass by mistake, so the error can say what the file is.
_OTHER_FORMATS = [
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF (WebP/WAV) file"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
    (b"version https://git-lfs", "a Git LFS pointer (run 'git lfs pull' to fetch the real file)"),
]


@dataclass
class Checkpoint:
    """The tensors of one weights file, with what was found beside them."""

    path: Path
    format: str  # "safetensors", "torch-zip" or "torch-legacy"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata (editlab's config lives here)
    skipped: dict[str, str] = field(default_factory=dict)  # non-tensor entries of the state dict -> reason


def sniff_format(path: str | Path) -> str:
    """The container format of ``path`` from its first bytes: "safetensors", "torch-zip" or "torch-legacy".

    Raises WeightsError naming what the file looks like when it is none of them.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download?)")
    if head[8:10] in (b'{"', b"{}"):  # checked first: the header length's low byte may well be 0x80
        header_len = struct.unpack("<Q", head[:8])[0]
        if 8 + header_len > size:
            raise WeightsError(f"{path}: damaged or truncated safetensors file (header of {header_len} bytes, "
                               f"file of {size}); download it again")
        return "safetensors"
    if head.startswith(b"PK"):
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise WeightsError(f"{path}: this is {what}, not a checkpoint; pass a .ckpt, .safetensors or diffusers folder")
    if _looks_like_text(head):
        raise WeightsError(f"{path}: this is a text file, not a checkpoint; pass a .ckpt, .safetensors or diffusers folder")
    raise WeightsError(f"{path}: unknown file format (starts with {head[:8].hex()}); expected safetensors or a torch "
                       "checkpoint")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """All tensors of a weights file (safetensors or torch pickle), loaded on the CPU without running code."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, fmt)


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors has its own error types for every kind of damage
        raise WeightsError(f"{path}: damaged or truncated safetensors file ({_first_line(err)}); download it again") from None
    return Checkpoint(path, "safetensors", tensors, metadata)


def _read_torch(path: Path, fmt: str) -> Checkpoint:
    try:
        # weights_only=True: only tensors and plain containers can be unpickled; never falls back.
        # torch.load trusts a ".safetensors" name, so such a file (a pickle, by its bytes) goes in as a file
        # object; everything else by path, memory-mapped when zip-based (multi-GB checkpoints).
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as err:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it would import {culprit.group(1)}" if culprit else "it holds more than tensors"
        raise WeightsError(f"{path}: refused to unpickle: {what}, which weights_only=True does not allow; nothing in it "
                           "was run. If you trust its origin, convert it to safetensors in a sandbox") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: damaged or truncated torch checkpoint ({_first_line(err)}); download it again") from None
    state = obj
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        if "global_step" in state:
            log.debug("%s: global_step %s", path, state["global_step"])
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    tensors, skipped = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            skipped[str(key)] = f"not a tensor ({type(value).__name__})"
    return Checkpoint(path, fmt, tensors, {}, skipped)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line WeightsError."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def sha256_of(paths: list[Path], root: Path | None = None) -> str:
    """sha256 of one file, or of a set of files under ``root`` (a diffusers folder): then the sha256 of the
    lines "relative/path sha256", sorted by path."""
    if len(paths) == 1 and root is None:
        return _sha256_file(paths[0])
    lines = sorted(f"{p.relative_to(root).as_posix()} {_sha256_file(p)}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
