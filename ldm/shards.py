"""WebDataset tar shards: the sharded data format of LAION-scale training, written and indexed here.

A shard is a plain POSIX tar file, ``PREFIX-000000.tar``. A *sample* is the run of consecutive members that
share a *key*, the member name up to its first dot; the rest of the name is the *part*:

    000042.before.png  000042.after.png  000042.txt  000042.json      (an InstructPix2Pix pair)
    000007.png         000007.hint.png   000007.txt                   (a ControlNet triple)

so any WebDataset reader (``webdataset.WebDataset(urls)``) reads editlab's shards and editlab reads theirs.
Writing is deterministic (members sorted by part, mtime 0, owner 0, mode 0644: the same samples give the
same bytes) and atomic (a temporary renamed when complete: a shard is whole or absent).

Reading (``index_shards``) walks only the tar headers and keeps, per sample, where each part's bytes lie;
``read_parts`` then seeks to them. A shard that is not a tar, or is cut short, is skipped with a warning
naming it and counted; so is a sample that lacks a required part.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .files import atomic_path

log = logging.getLogger(__name__)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``samples`` ((key, {part: bytes}) in order) into the tar shard ``path``; returns their number.
    Keys may not contain dots or slashes (the dot starts the part)."""
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, parts in samples:
            if not key or "." in key or "/" in key:
                raise ValueError(f"sample key {key!r}: use a name without dots or slashes")
            for part in sorted(parts):
                data = parts[part]
                info = tarfile.TarInfo(f"{key}.{part}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into ShardIndex.paths
    key: str
    parts: tuple[tuple[str, int, int], ...]  # (part, byte offset, size)


@dataclass
class ShardIndex:
    paths: list[Path]
    samples: list[SampleRef]
    skipped_shards: list[str] = field(default_factory=list)  # "path: reason"
    skipped_samples: list[str] = field(default_factory=list)

    def name(self, ref: SampleRef) -> str:
        return f"{self.paths[ref.shard].name}:{ref.key}"


def list_shards(folder: str | Path) -> list[Path]:
    """The .tar files of ``folder`` in name order (empty if none)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*.tar") if p.is_file()) if folder.is_dir() else []


def _members(path: Path) -> list[tarfile.TarInfo]:
    size = path.stat().st_size
    with tarfile.open(path, "r:") as tar:  # uncompressed only: the parts must be seekable
        members = tar.getmembers()
    for member in members:
        if member.isfile() and member.offset_data + member.size > size:
            raise tarfile.ReadError(f"cut short in {member.name} ({size} bytes, the member ends at "
                                    f"{member.offset_data + member.size})")
    if not members:
        raise tarfile.ReadError("no members")
    return members


def index_shards(paths: Iterable[str | Path], required: tuple[str, ...]) -> ShardIndex:
    """Where every sample's parts lie in ``paths``; unreadable shards and samples missing one of
    ``required`` are skipped with a warning and listed."""
    index = ShardIndex([Path(p) for p in paths], [])
    for number, path in enumerate(index.paths):
        try:
            members = _members(path)
        except (tarfile.TarError, OSError, EOFError) as err:
            log.warning("%s: skipped: not a readable tar shard (%s)", path, err)
            index.skipped_shards.append(f"{path}: {err}")
            continue
        groups: dict[str, list[tuple[str, int, int]]] = {}
        for member in members:
            if member.isfile() and "." in Path(member.name).name:
                key, part = member.name.split(".", 1)
                groups.setdefault(key, []).append((part, member.offset_data, member.size))
        for key, parts in groups.items():
            missing = [r for r in required if r not in {p for p, _, _ in parts}]
            if missing:
                log.warning("%s:%s: skipped: no %s part", path, key, ", ".join(missing))
                index.skipped_samples.append(f"{path.name}:{key}")
                continue
            index.samples.append(SampleRef(number, key, tuple(parts)))
    return index


def read_parts(index: ShardIndex, ref: SampleRef) -> dict[str, bytes]:
    """The bytes of every part of one sample."""
    out = {}
    with open(index.paths[ref.shard], "rb") as f:
        for part, offset, size in ref.parts:
            f.seek(offset)
            out[part] = f.read(size)
            if len(out[part]) != size:
                raise EOFError(f"{index.name(ref)}.{part}: {len(out[part])} of {size} bytes")
    return out
