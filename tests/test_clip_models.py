"""ldm/clip_models.py: loading an open_clip CLIP from a local file refuses files that lack a part the
caller will use (no silently random text tower)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.clip_models import load_clip

TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_a_file_without_the_text_tower_loads_only_where_no_text_is_encoded(tmp_path):
    import open_clip

    torch.manual_seed(0)
    state = open_clip.model.CLIP(**TINY).state_dict()
    config = tmp_path / "clip.json"
    config.write_text(json.dumps(TINY))
    image_only = {k: v for k, v in state.items() if k.startswith("visual.") or k == "text_projection"}
    save_file(image_only, str(tmp_path / "image.safetensors"))
    save_file(state, str(tmp_path / "full.safetensors"))
    model = load_clip(tmp_path / "image.safetensors", config)  # Visii's loss needs no more
    assert torch.equal(model.visual.conv1.weight, state["visual.conv1.weight"])
    with pytest.raises(ValueError, match="missing"):
        load_clip(tmp_path / "image.safetensors", config, text_tower=True)
    full = load_clip(tmp_path / "full.safetensors", config, text_tower=True)
    assert torch.equal(full.token_embedding.weight, state["token_embedding.weight"])
