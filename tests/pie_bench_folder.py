"""A one-case PIE-Bench folder as its release lays it out (mapping_file.json + annotation_images/), for tests."""

import json
from pathlib import Path

from PIL import Image

ENTRY = {"original_prompt": "a [cat] on a mat", "editing_prompt": "a [dog] on a mat",
         "editing_instruction": "make it a dog", "editing_type_id": "1", "blended_word": "cat dog",
         "mask": [1000, 20]}  # run-length mask: 1000 pixels off, then 20 on


def write_pie_bench(root: Path, suffix: str = ".jpg") -> Path:
    """Case "000000000000": a flat 512² image, a cat → dog word swap with its bracket marks and mask."""
    image_path = f"0_random_140/000{suffix}"
    (root / "annotation_images" / "0_random_140").mkdir(parents=True)
    Image.new("RGB", (512, 512), (10, 20, 30)).save(root / "annotation_images" / image_path)
    (root / "mapping_file.json").write_text(json.dumps({"000000000000": {"image_path": image_path, **ENTRY}}))
    return root
