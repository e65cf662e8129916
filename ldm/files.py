"""Writing files so that nothing is ever half-written (write beside the target, then rename over it), and
naming a file's exact content (its SHA-256).

A temporary file is named ``.NAME.PID.XXXX.tmp`` beside its target. A process killed mid-write (SIGKILL, power
loss) cannot remove its own; the next write of the same target removes those whose process is gone.
Safetensors files are written with their metadata keys in sorted order, so that identical runs write
identical bytes (the safetensors library keeps metadata in a hash map and writes it in a random order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that ``atomic_path`` leaves beside ``path`` when a process is killed mid-write
    (".NAME.PID.XXXX.tmp"), except those of a writer that still runs. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp")):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue  # a write in progress
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the same folder; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically, with the metadata keys in sorted order (same run, same bytes)."""
    from safetensors.torch import save_file

    # a tensor that is a view into a larger one (fused attention projections hold Q, K, V in one matrix) is
    # written as its own copy: safetensors refuses tensors that share memory
    tensors = {name: t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
               for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of a safetensors file in place with ``__metadata__`` in sorted key order (the header
    keeps its length: only the order of the same key/value pairs changes)."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the library's compact JSON; never corrupt the file
            raise RuntimeError(f"{path}: safetensors header grew when sorted ({len(text)} > {size} bytes)")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # the format pads headers with spaces


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
