"""safetensors files read and written one tensor at a time, so that a multi-GB model is never held twice.

The format (huggingface/safetensors): 8 bytes little-endian N, N bytes of JSON header
``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}``,
then the raw little-endian bytes of every tensor, offsets relative to the end of the header.

- ``read_tensors``: plain ``readinto`` of each tensor into its own freshly allocated (optionally
  cast) tensor: the process holds exactly one copy, and nothing of the file stays mapped.
- ``map_tensors``: tensors that *are* pages of a private memory map of the file (nothing is read until a
  tensor is used): for conversion, where most tensors are only renamed and written out again.
- ``write_tensors``: the header first, then each tensor's bytes in turn (a transient copy of one tensor at
  most), atomically (ldm/files.py).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from .files import atomic_path

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """(metadata, {name: (dtype, shape, begin, end)}, offset of the data) of a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise SafetensorsError(f"{path}: header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path}: unreadable header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], list(info["shape"])
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize or 8 + length + end > size:
            raise SafetensorsError(f"{path}: tensor {name} does not fit its data offsets (truncated file?)")
        entries[name] = (dtype, shape, begin, end)
    return metadata, entries, 8 + length


def _bytes_of(tensor: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's memory (any dtype, bf16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def read_tensors(path: str | Path, dtype_for: Callable[[str], torch.dtype | None] | None = None
                 ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors), each tensor read straight into its own memory; ``dtype_for(name)`` may ask for a
    floating tensor in another dtype (cast one tensor at a time, so fp32 files load into fp16 at half size)."""
    metadata, entries, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda e: e[1][2]):
            tensor = torch.empty(shape, dtype=dtype)
            if end > begin:
                f.seek(start + begin)
                if f.readinto(_bytes_of(tensor)) != end - begin:
                    raise SafetensorsError(f"{path}: tensor {name} is cut short (truncated file?)")
            wanted = dtype_for(name) if dtype_for else None
            if wanted is not None and tensor.is_floating_point() and wanted != dtype:
                tensor = tensor.to(wanted)
            tensors[name] = tensor
    return metadata, tensors


def map_tensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) backed by a private (copy-on-write) memory map: a tensor's pages are read from
    the file when first touched and never copied unless written to."""
    metadata, entries, start = read_header(path)
    tensors = {}
    if not entries:
        return metadata, tensors
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # stays alive while a tensor views it
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=start + begin)
        if (start + begin) % dtype.itemsize:  # unaligned data (not written by safetensors itself): copy
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(shape)
    return metadata, tensors


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a safetensors file one tensor at a time (atomically); ``dtype`` casts the floating tensors as
    they are written."""
    items = dict(tensors.items() if isinstance(tensors, dict) else tensors)
    stored = {name: dtype if dtype is not None and t.is_floating_point() else t.dtype for name, t in items.items()}
    specs = [(name, tuple(t.shape), stored[name]) for name, t in items.items()]
    write_produced(path, specs, lambda name: items[name].detach().to("cpu", stored[name]), metadata)


def write_produced(path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                   produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write (name, shape, dtype) ``specs``, asking ``produce(name)`` for each tensor only when it is written."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}  # same run, same bytes
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in NAMES:
            raise SafetensorsError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in specs:
            if torch.Size(shape).numel():
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise SafetensorsError(f"tensor {name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                           f"announced {tuple(shape)} {dtype}")
                f.write(_bytes_of(tensor.contiguous()).data)
