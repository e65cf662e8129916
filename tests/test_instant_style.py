"""InstantStyle: block specifications (presets, diffusers dicts, errors for blocks the model lacks) and
content subtraction (its formula, its place before the projection, the CLIP text embedding it subtracts)."""

import pytest
import torch

from controls.ip_adapter import IPAdapter, generate_with_image_prompt
from editing.instant_style import (block_layers, block_scales, content_embedding, instant_style, preset_scales,
                                   subtract_content)
from ldm.clip import CLIPTextModel
from ldm.config import TextEncoderConfig, sd15, tiny_text
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig
from ldm.tokenizer import Tokenizer
from ldm.unet import UNet
from tests.peers import randomize_, relative_error
from tests.test_ip_adapter import EMBED_DIM, PROMPT, SAMPLING, sd1_like

SDXL_STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}  # InstantStyle's SDXL recipe (docs/methods.md §9.3 item 1)


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.device("meta"):
        return UNet(sd15().unet)


def test_presets_name_the_sd15_blocks(sd15_unet):
    style = preset_scales(sd15_unet, "style", 0.8)
    assert style == {f"up.1.{j}.cross": 0.8 for j in range(3)}
    layout = preset_scales(sd15_unet, "style+layout")
    assert layout == {**{f"down.2.{j}.cross": 1.0 for j in range(2)}, "mid.0.0.cross": 1.0,
                      **{f"up.1.{j}.cross": 1.0 for j in range(3)}}


def test_diffusers_dicts_and_single_attentions(sd15_unet):
    nested = {"down": {"block_2": [0.25, 1.0]}, "mid": 0.5, "up": {"block_1": 1.0}}
    flat = {"down_blocks.2.attentions.0": 0.25, "down_blocks.2.attentions.1": 1.0, "mid_block": 0.5,
            "up_blocks.1": 1.0}
    assert block_scales(sd15_unet, nested) == block_scales(sd15_unet, flat)
    assert block_scales(sd15_unet, {"up_blocks.1": 1.0, "up_blocks.1.attentions.0": 0.0}) == \
        {"up.1.0.cross": 0.0, "up.1.1.cross": 1.0, "up.1.2.cross": 1.0}  # later entries override


@pytest.mark.parametrize("spec,match", [
    (SDXL_STYLE, "up_blocks.0.*no cross-attention"),  # SD 1.5's up_blocks.0 has no attention
    ({"down_blocks.3": 1.0}, "down_blocks.3.*no cross-attention"),
    ({"up_blocks.1.attentions.3": 1.0}, "no cross-attention"),
    ({"up.1.0.cross": 1.0}, "not a diffusers block name"),
    ({"up": {"block_1": [1.0, 1.0]}}, "2 scales for its 3"),
    ({"left": 1.0}, "not a diffusers block name"),
])
def test_specs_the_model_cannot_honour_raise(sd15_unet, spec, match):
    with pytest.raises(ValueError, match=match):
        block_scales(sd15_unet, spec)


def test_unknown_preset_raises(sd15_unet):
    with pytest.raises(ValueError, match="choose one of"):
        preset_scales(sd15_unet, "composition")


def test_preset_on_a_model_without_the_blocks_raises():
    from ldm.config import tiny_sd1

    with torch.device("meta"):
        unet = UNet(tiny_sd1().unet)  # 3 levels, attention in levels 0-1 only: no down_blocks.2 attention
    with pytest.raises(ValueError, match="down_blocks.2"):
        preset_scales(unet, "style+layout")
    assert block_layers(unet, "mid_block") == ["mid.0.0.cross"]


def test_subtract_content_formula():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 16, generator=g), torch.randn(1, 16, generator=g)
    out = subtract_content(image, text, 0.8)
    assert torch.allclose(out, image - 0.8 * text)  # e' = e_img − λ_c·t (no normalisation)
    assert torch.equal(subtract_content(image, text), out)  # λ_c defaults to 0.8
    with pytest.raises(ValueError, match="width"):
        subtract_content(image, torch.zeros(1, 8))


@torch.no_grad()
def test_content_embedding_is_clips_projected_text_embedding():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = TextEncoderConfig(**{**tiny_text(32, pad_token_id=0, activation="gelu").__dict__, "projection_dim": 24})
    ours = randomize_(CLIPTextModel(cfg), seed=4).eval()
    peer = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, projection_dim=24,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, hidden_act="gelu",
        max_position_embeddings=cfg.max_length, pad_token_id=0)).eval()
    state = ours.state_dict()
    if not any(k.startswith("text_model.") for k in peer.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = peer.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    tokenizer = Tokenizer(pad_token_id=0)
    expected = peer(input_ids=tokenizer(["a girl"])).text_embeds
    assert relative_error(expected, content_embedding(ours, tokenizer, "a girl")) < 1e-4
    with pytest.raises(ValueError, match="text_projection"):
        content_embedding(CLIPTextModel(tiny_text()), tokenizer, "a girl")


def test_subtraction_happens_before_the_projection():
    model = randomize_(StableDiffusion(sd1_like()), seed=0).eval()
    adapter = randomize_(IPAdapter(model.unet, embed_dim=EMBED_DIM), seed=1).eval()
    g = torch.Generator().manual_seed(3)
    style, content = torch.randn(1, EMBED_DIM, generator=g), torch.randn(1, EMBED_DIM, generator=g)
    scales = preset_scales(model.unet, "style+layout")
    cfg = SamplingConfig(**{**SAMPLING.__dict__, "steps": 2})
    ours = instant_style(model, adapter, style, PROMPT, scales, content, 0.8, cfg, progress=False)
    before = generate_with_image_prompt(model, adapter, style - 0.8 * content, PROMPT, scales, cfg, progress=False)
    assert torch.equal(ours, before)
    unsubtracted = instant_style(model, adapter, style, PROMPT, scales, None, 0.8, cfg, progress=False)
    assert relative_error(unsubtracted, ours) > 1e-3


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny model, adapter, image encoder (transformers folder), open_clip text tower and style image."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from ldm.clip_vision import tiny_vision
    from tests.peers import make_open_clip_text
    from tests.test_clip_vision import transformers_peer

    folder = tmp_path_factory.mktemp("style_cli")
    model = randomize_(StableDiffusion(sd1_like()), seed=0).eval()
    model.save(folder / "model.safetensors")
    adapter = randomize_(IPAdapter(model.unet, embed_dim=EMBED_DIM), seed=1)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, folder / "ip.safetensors")
    (folder / "encoder").mkdir()
    encoder = transformers_peer(tiny_vision(projection_dim=EMBED_DIM), seed=2)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / "encoder" / "model.safetensors")
    (folder / "encoder" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_act": "gelu"}))
    text_cfg = TextEncoderConfig(**{**tiny_text(64).__dict__, "n_heads": 1, "n_layers": 1})
    tower = make_open_clip_text(text_cfg, seed=3, projection_dim=EMBED_DIM)  # 2 blocks: all are kept
    text = {k: v.contiguous() for k, v in tower.state_dict().items() if k != "attn_mask"}
    save_file(text, folder / "text.safetensors")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "style.png")
    return folder


def _style_cli(folder, *extra):
    from editing.cli import main

    return main(["style", "--weights", str(folder / "model.safetensors"),
                 "--ip-adapter", str(folder / "ip.safetensors"),
                 "--image-encoder", str(folder / "encoder"), "--style-image", str(folder / "style.png"),
                 "--prompt", PROMPT[0], "--steps", "2", "--height", "16", "--width", "16", *extra])


def test_cli_matches_the_library(cli_files, capsys):
    import numpy as np
    from PIL import Image

    from ldm.clip_vision import preprocess
    from ldm.pipeline import decode_latents
    from weights_convert.clip_vision import load_image_encoder, load_text_with_projection
    from weights_convert.ip_adapter import load_ip_adapter

    out = cli_files / "out.png"
    assert _style_cli(cli_files, "--preset", "style", "--scale", "0.9", "--content-prompt", "a girl",
                      "--text-encoder", str(cli_files / "text.safetensors"), "--out", str(out)) == 0
    model = StableDiffusion.load(cli_files / "model.safetensors")
    adapter, _ = load_ip_adapter(cli_files / "ip.safetensors", model.unet)
    encoder, _ = load_image_encoder(cli_files / "encoder")
    text, report = load_text_with_projection(cli_files / "text.safetensors")
    assert text.config.n_layers == 2 and report.ok  # the full tower, projection included
    with torch.no_grad():
        style = encoder(preprocess(Image.open(cli_files / "style.png"), 28))
    content = content_embedding(text, Tokenizer(pad_token_id=0), "a girl")
    cfg = SamplingConfig(steps=2, guidance=5.0, seed=0, height=16, width=16)
    latents = instant_style(model, adapter, style, PROMPT, preset_scales(model.unet, "style", 0.9), content, 0.8, cfg,
                            progress=False)
    expected = decode_latents(model, latents)[0].permute(1, 2, 0).numpy() * 255
    written = np.asarray(Image.open(out), dtype=np.float32)
    assert np.abs(written - expected).max() <= 1.0


def test_cli_errors_are_one_line(cli_files, capsys):
    out = str(cli_files / "bad.png")
    assert _style_cli(cli_files, "--content-prompt", "a girl", "--out", out) == 2
    assert "--content-prompt needs --text-encoder" in capsys.readouterr().err
    assert _style_cli(cli_files, "--block", "up_blocks.0=1.0", "--out", out) == 2  # SDXL's block on SD 1.5
    assert "up_blocks.0" in capsys.readouterr().err
    assert _style_cli(cli_files, "--block", "up_blocks.1", "--out", out) == 2
    assert "NAME=SCALE" in capsys.readouterr().err
