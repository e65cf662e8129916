"""``editlab style`` on SDXL end to end, with IP-Adapter files laid out as h94/IP-Adapter has them:

    sdxl_models/ip-adapter_sdxl.safetensors        + sdxl_models/image_encoder/  (ViT-bigG kind)
    sdxl_models/ip-adapter_sdxl_vit-h.safetensors  + models/image_encoder/       (ViT-H kind)

each encoder a transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors), tiny and
random, of a different width and projection per kind (bigG kind: projection 48 = the tiny SDXL's pooled bigG
text width, as 1280 = 1280 at full size). The command's PNG equals diffusers' ``load_ip_adapter`` (same folders,
same image encoder, its own CLIPImageProcessor) + ``set_ip_adapter_scale`` with the same per-block dict,
within 2/255 per pixel (decoded images; the latents agree to float rounding, tests/test_sdxl_methods.py).
The presets' block selection itself is tested in tests/test_sdxl_methods.py.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from editing.cli import main
from ldm.config import tiny_sdxl
from ldm.images import read_parameters
from tests.peers_sdxl import ip_adapter_state, make_sdxl_folder, save_image_encoder, save_ip_adapter
from weights_convert import convert

KINDS = {  # kind -> (adapter file, image_encoder_folder as diffusers takes it, width, heads, projection)
    "bigG": ("ip-adapter_sdxl.safetensors", "image_encoder", 40, 4, 48),
    "vit-h": ("ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder", 32, 2, 24),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(tiny SDXL editlab file, its diffusers pipeline, an h94/IP-Adapter-like folder, a style image)."""
    from ldm.model import StableDiffusion

    folder = tmp_path_factory.mktemp("sdxl-style")
    pipe = make_sdxl_folder(tiny_sdxl(), folder / "diffusers", seed=21)
    convert(folder / "diffusers", folder / "sdxl.safetensors")
    unet = StableDiffusion.load(folder / "sdxl.safetensors").unet
    root = folder / "IP-Adapter"
    for i, (kind, (file, encoder_folder, width, heads, projection)) in enumerate(KINDS.items()):
        save_ip_adapter(ip_adapter_state(unet, projection, seed=30 + i), (root / "sdxl_models").mkdir(
            parents=True, exist_ok=True) or root / "sdxl_models" / file)
        save_image_encoder(root / "sdxl_models" / encoder_folder if "/" not in encoder_folder else root / encoder_folder,
                           width, heads, projection, seed=40 + i)
    save_ip_adapter(ip_adapter_state(unet, 24, seed=50, token_dim=32), root / "ip-adapter_sd15.safetensors")
    pixels = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "style.png")
    return folder / "sdxl.safetensors", pipe, root, folder / "style.png"


def _encoder_path(root, kind):
    folder = KINDS[kind][1]
    return root / folder if "/" in folder else root / "sdxl_models" / folder


def _style(repo, kind, out, *extra):
    weights, _, root, style = repo
    return main(["style", "--weights", str(weights), "--ip-adapter", str(root / "sdxl_models" / KINDS[kind][0]),
                 "--image-encoder", str(_encoder_path(root, kind)), "--style-image", str(style),
                 "--prompt", "a cat", "--negative", "blurry", "--steps", "4", "--guidance", "5", "--seed", "4",
                 "--height", "32", "--width", "48", "--out", str(out), *extra])


def _diffusers(pipe, root, kind, scale, **inputs):
    from editing.bench.peers import diffusers_scheduler

    pipe.load_ip_adapter(str(root), subfolder="sdxl_models", weight_name=KINDS[kind][0],
                         image_encoder_folder=KINDS[kind][1], local_files_only=True)
    try:
        pipe.set_ip_adapter_scale(scale)
        pipe.scheduler = diffusers_scheduler("ddim", "epsilon")
        return pipe(prompt="a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=32,
                    width=48, generator=torch.Generator().manual_seed(4), output_type="pt", **inputs).images[0]
    finally:
        pipe.unload_ip_adapter()  # also drops the image encoder and its feature extractor


def _png(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255


@torch.no_grad()
def test_vit_h_adapter_with_blocks_matches_diffusers(repo, tmp_path):
    _, pipe, root, style = repo
    out = tmp_path / "vit-h.png"
    assert _style(repo, "vit-h", out, "--block", "up_blocks.0.attentions.1=0.8",
                  "--block", "down_blocks.2.attentions.1=0.5") == 0
    ref = _diffusers(pipe, root, "vit-h", {"up": {"block_0": [0.0, 0.8, 0.0]}, "down": {"block_2": [0.0, 0.5]}},
                     ip_adapter_image=Image.open(style))
    assert (_png(out) - ref).abs().max() <= 2 / 255
    assert read_parameters(out)["image_encoder"] == "models/image_encoder"


@torch.no_grad()
def test_bigG_adapter_style_preset_with_content_subtraction_matches_diffusers(repo, tmp_path):
    """The paper's style preset and content subtraction with the model's own bigG pooled embedding; diffusers
    has no subtraction, so its image embeddings are subtracted by hand (the InstantStyle recipe)."""
    _, pipe, root, style = repo
    out = tmp_path / "bigG.png"
    assert _style(repo, "bigG", out, "--preset", "style", "--content-prompt", "a dog", "--content-scale", "0.5") == 0
    pipe.load_ip_adapter(str(root), subfolder="sdxl_models", weight_name=KINDS["bigG"][0],
                         image_encoder_folder=KINDS["bigG"][1], local_files_only=True)
    pixels = pipe.feature_extractor(Image.open(style), return_tensors="pt").pixel_values
    embeds = pipe.image_encoder(pixels).image_embeds
    _, _, pooled, _ = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)
    pipe.unload_ip_adapter()
    embeds = embeds - 0.5 * pooled
    ref = _diffusers(pipe, root, "bigG", {"up": {"block_0": [0.0, 1.0, 0.0]}},
                     ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]])
    assert (_png(out) - ref).abs().max() <= 2 / 255
    plain = tmp_path / "plain.png"
    assert _style(repo, "bigG", plain, "--preset", "style") == 0
    assert (_png(plain) - _png(out)).abs().max() > 4 / 255  # the subtraction changed the image


def test_mismatched_adapter_encoder_and_model_are_one_line_errors(repo, tmp_path, capsys):
    weights, _, root, style = repo
    common = ["style", "--weights", str(weights), "--style-image", str(style), "--prompt", "a", "--steps", "1",
              "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png")]
    cases = [  # ViT-H adapter with the bigG encoder; SD 1.5 adapter on SDXL; ViT-H content without a text tower
        (["--ip-adapter", str(root / "sdxl_models" / KINDS["vit-h"][0]), "--image-encoder",
          str(_encoder_path(root, "bigG"))], ("24-wide", "48-wide", "--image-encoder")),
        (["--ip-adapter", str(root / "ip-adapter_sd15.safetensors"), "--image-encoder",
          str(_encoder_path(root, "vit-h"))], ("32 wide", "80", "ip-adapter_sdxl")),
        (["--ip-adapter", str(root / "sdxl_models" / KINDS["vit-h"][0]), "--image-encoder",
          str(_encoder_path(root, "vit-h")), "--content-prompt", "a dog"], ("--text-encoder", "24-wide")),
    ]
    capsys.readouterr()
    for extra, words in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err


@pytest.mark.parametrize("width, layers, mlp, projection", [(1664, 48, 8192, 1280), (1280, 32, 5120, 1024)])
def test_full_size_image_encoders_match_transformers(width, layers, mlp, projection):
    """ViT-bigG/14 (sdxl_models/image_encoder) and ViT-H/14 (models/image_encoder) at full size, on the meta
    device: the same parameters by name and shape as transformers' CLIPVisionModelWithProjection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as Peer

    from ldm.clip_vision import CLIPVisionModelWithProjection, VisionConfig

    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(VisionConfig(width=width, n_layers=layers, n_heads=16, mlp_dim=mlp,
                                                          projection_dim=projection))
        peer = Peer(CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                                     num_attention_heads=16, projection_dim=projection, image_size=224, patch_size=14))
    theirs = {k: v.shape for k, v in peer.state_dict().items() if not k.endswith("position_ids")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
