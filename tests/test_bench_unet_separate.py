"""``bench unet --separate``'s steps run in this process on the tiny SDXL preset: diffusers' saved ``unet/``
folder goes through editlab's converter (strict, config.json read back as the preset) and both contenders
give the same output (to 1e-5 of its scale: editlab runs channels_last with fused projections, which round
differently) and a resident-memory reading."""

import torch

from editing.bench.unet_separate import CONTENDERS, _contender, _convert, _write_diffusers_unet
from tests.peers import relative_error


def test_separate_steps_convert_and_agree(tmp_path):
    folder, converted = str(tmp_path / "unet"), str(tmp_path / "unet.editlab.safetensors")
    _write_diffusers_unet("tiny-sdxl", folder, 0)
    assert "converted 838 tensors" in _convert("tiny-sdxl", folder, converted)
    runs = {name: _contender(name, "tiny-sdxl", folder, converted, 1, 8, torch.float32, torch.get_num_threads(), 0, 1,
                             str(tmp_path / f"{name}.pt")) for name in CONTENDERS}
    ours, theirs = (torch.load(str(tmp_path / f"{name}.pt"), weights_only=True) for name in ("editlab", "diffusers"))
    assert theirs.std() > 0.1 and relative_error(theirs, ours) <= 1e-5
    assert all(len(r["seconds"]) == 1 and r["peak"] >= r["before"] > 0 for r in runs.values())
