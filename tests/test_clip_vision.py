"""The CLIP image tower against transformers' CLIPVisionModelWithProjection and open_clip's VisionTransformer,
its weight conversion from both layouts, and CLIPImageProcessor's preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldm.clip_vision import CLIPVisionModelWithProjection, VisionConfig, preprocess, tiny_vision
from tests.peers import randomize_, relative_error
from weights_convert.clip_vision import load_image_encoder


def transformers_peer(cfg: VisionConfig, seed: int, meta: bool = False):
    from transformers import CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection as HFVision

    hf_cfg = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
                              num_attention_heads=cfg.n_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                              projection_dim=cfg.projection_dim, hidden_act=cfg.activation)
    if not meta:
        return randomize_(HFVision(hf_cfg), seed).eval()
    with torch.device("meta"):  # skip the library's slow init: build empty, then fill
        model = HFVision(hf_cfg)
    model = model.to_empty(device="cpu")
    model.vision_model.embeddings.position_ids = torch.arange(cfg.n_positions).unsqueeze(0)
    return randomize_(share_layer_matrices_(model), seed).eval()  # shared matrices are filled once


@torch.no_grad()
def share_layer_matrices_(model: nn.Module) -> nn.Module:
    """Let every encoder layer reuse layer 0's weight matrices (each layer keeps its own random norms and
    biases, so the layers still compute different functions): full-size shapes at 1/30 of the memory writes."""
    layers = model.vision_model.encoder.layers
    first = dict(layers[0].named_parameters())
    for layer in layers[1:]:
        for name, param in list(layer.named_parameters()):
            if param.ndim == 2:
                owner, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(owner), leaf, first[name])
    return model


def pixels(cfg: VisionConfig, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_tiny_matches_transformers_through_a_saved_file(tmp_path):
    cfg = tiny_vision()
    peer = transformers_peer(cfg, seed=0)
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, tmp_path / "encoder.safetensors")
    ours, report = load_image_encoder(tmp_path / "encoder.safetensors", config=cfg)
    x = pixels(cfg)
    expected = peer(pixel_values=x).image_embeds
    assert expected.shape == (2, cfg.projection_dim)
    assert relative_error(expected, ours(x)) < 1e-4
    assert report.ok and report.filled == len(ours.state_dict())


@torch.no_grad()
def test_open_clip_layout_matches_open_clip_and_transformers(tmp_path):
    from open_clip.transformer import VisionTransformer

    cfg = tiny_vision()
    tower = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                              layers=cfg.n_layers, heads=cfg.n_heads, mlp_ratio=cfg.mlp_dim / cfg.width,
                              output_dim=cfg.projection_dim, act_layer=nn.GELU)
    tower = randomize_(tower, seed=3).eval()
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)  # a whole-model file: must be ignored, not refused
    save_file(state, tmp_path / "open_clip.safetensors")
    ours, report = load_image_encoder(tmp_path / "open_clip.safetensors", config=cfg)
    assert report.info["layout"] == "open_clip" and "logit_scale" in report.ignored
    x = pixels(cfg)
    expected = tower(x)
    assert relative_error(expected, ours(x)) < 1e-4
    # the same weights in transformers' model give the same embedding
    peer = transformers_peer(cfg, seed=0)
    missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    assert relative_error(peer(pixel_values=x).image_embeds, expected) < 1e-4


@pytest.mark.full_size
@torch.no_grad()
def test_vit_h_shapes_match_transformers():
    cfg = VisionConfig()  # ViT-H/14: 1280 wide, 32 layers, 16 heads, MLP 5120, projection 1024
    peer = transformers_peer(cfg, seed=0, meta=True)
    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(cfg)
    state = {k: v for k, v in peer.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True, assign=True)  # shares the peer's tensors: no second copy
    assert 625e6 < sum(p.numel() for p in ours.parameters()) < 640e6
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = peer(pixel_values=x).image_embeds
    assert expected.shape == (1, 1024)
    assert relative_error(expected, ours.eval()(x)) < 1e-4


def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    smooth = rng.random((30, 45, 3)).repeat(8, 0).repeat(8, 1)  # 240×360, non-square: the crop drops borders
    image = Image.fromarray((smooth * 255).astype(np.uint8))
    expected = CLIPImageProcessor()(images=image, return_tensors="pt")["pixel_values"]
    ours = preprocess(image)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    # PIL and torchvision bicubic kernels differ by a grey level or so: 2/255 in std units
    assert (ours - expected).abs().max() < 2 / 255 / 0.26
    assert (ours - expected).abs().mean() < 0.1 / 255 / 0.26


def test_wrong_pixel_shape_is_a_clear_error():
    model = CLIPVisionModelWithProjection(tiny_vision())
    with pytest.raises(ValueError, match="preprocess"):
        model(torch.zeros(1, 3, 32, 32))
