"""`editlab demo` (the README's first command) on the bundled toy model: every file is written, records its
parameters, and shows what it claims (read with ldm/toy/readers.py)."""

import numpy as np
import pytest
from PIL import Image

from editing.cli import main
from editing.options import TOY_WEIGHTS
from ldm.images import read_parameters
from ldm.toy.readers import mask_iou, object_mask, read_colour

pytestmark = pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason=f"toy weights {TOY_WEIGHTS} not built")
FILES = ["1-generated.png", "2-p2p-source.png", "2-p2p-swapped.png", "2-p2p-attention-source.png",
         "2-p2p-attention-swapped.png", "3-ddpm-input.png", "3-ddpm-edited.png"]


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def test_demo_writes_every_image_with_its_parameters(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in FILES)
    assert read_parameters(out / "2-p2p-swapped.png")["edit"] == "a red square on a blue background"
    assert read_parameters(out / "3-ddpm-edited.png")["skip"] == 35
    # the generated image is a red object; the P2P source row is that same image's prompt from the same noise
    generated = _rgb(out / "1-generated.png")
    assert read_colour(generated, object_mask(generated)) == "red"
    # the word swap keeps the object where it was
    source, swapped = _rgb(out / "2-p2p-source.png"), _rgb(out / "2-p2p-swapped.png")
    assert mask_iou(object_mask(source), object_mask(swapped)) >= 0.7
    # the DDPM edit recolours the rendered circle and keeps its place
    real, edited = _rgb(out / "3-ddpm-input.png"), _rgb(out / "3-ddpm-edited.png")
    assert read_colour(edited, object_mask(edited)) == "green"
    assert mask_iou(object_mask(real), object_mask(edited)) >= 0.7
    # attention grids: one labelled tile per token, 9 tokens (start, 7 words, end) in two rows
    grid = Image.open(out / "2-p2p-attention-source.png")
    assert grid.size[0] == 8 * 96 and grid.size[1] > 2 * 96
    # running it again into the same folder is the same run: allowed, and byte-identical
    before = (out / "3-ddpm-edited.png").read_bytes()
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / "3-ddpm-edited.png").read_bytes() == before
