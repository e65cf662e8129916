"""ldm/safetensors_io.py against the safetensors library: files written one tensor at a time read back with
safetensors' own reader (and vice versa), memory-mapped reading, casting on the way, and damaged files."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.safetensors_io import SafetensorsError, map_tensors, read_tensors, write_tensors

TENSORS = {"a.weight": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
           "d": torch.tensor(1.5, dtype=torch.float16), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}


def test_round_trip_with_the_safetensors_library(tmp_path):
    write_tensors(tmp_path / "ours.safetensors", TENSORS, {"format": "x"})
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "x"}
        assert set(f.keys()) == set(TENSORS) and all(torch.equal(f.get_tensor(k), v) for k, v in TENSORS.items())
    save_file(TENSORS, str(tmp_path / "theirs.safetensors"), metadata={"format": "y"})
    for read in (read_tensors, map_tensors):
        metadata, tensors = read(tmp_path / "theirs.safetensors")
        assert metadata == {"format": "y"} and all(torch.equal(tensors[k], v) for k, v in TENSORS.items())
        assert all(tensors[k].dtype == v.dtype and tensors[k].shape == v.shape for k, v in TENSORS.items())


def test_casting_while_reading_and_writing(tmp_path):
    write_tensors(tmp_path / "half.safetensors", TENSORS, dtype=torch.float16)
    _, tensors = read_tensors(tmp_path / "half.safetensors", dtype_for=lambda name: torch.float32)
    assert tensors["a.weight"].dtype == torch.float32 and tensors["b"].dtype == torch.int64  # integers untouched
    assert torch.equal(tensors["a.weight"], TENSORS["a.weight"].half().float())


def test_memory_mapped_tensors_are_copy_on_write(tmp_path):
    write_tensors(tmp_path / "m.safetensors", TENSORS)
    _, mapped = map_tensors(tmp_path / "m.safetensors")
    mapped["a.weight"].zero_()  # a private mapping: the file keeps its values
    assert torch.equal(read_tensors(tmp_path / "m.safetensors")[1]["a.weight"], TENSORS["a.weight"])


def test_truncated_file_is_refused(tmp_path):
    write_tensors(tmp_path / "t.safetensors", TENSORS)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-8])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_tensors(tmp_path / "t.safetensors")
