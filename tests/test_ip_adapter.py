"""IP-Adapter: the processor index table, strict loading of both file forms, parity with diffusers'
load_ip_adapter + set_ip_adapter_scale (global scale and InstantStyle's block selections), and scale 0."""

import pytest
import torch
from safetensors.torch import save_file

from controls.ip_adapter import IPAdapter, generate_with_image_prompt, image_prompt_hook
from editing.bench.peers import diffusers_pipeline
from editing.instant_style import preset_scales
from ldm.config import ModelConfig, UNetConfig, VAEConfig, sd15, tiny_text
from ldm.model import StableDiffusion, WeightsError
from ldm.pipeline import SamplingConfig, text_to_image
from ldm.unet import UNet
from tests.peers import randomize_, relative_error
from weights_convert.ip_adapter import SD15_PROCESSOR_TABLE, block_table, load_ip_adapter

EMBED_DIM = 24  # the image encoder's projection width (1024 for ViT-H)
PROMPT = ["a photo of a cat"]
SAMPLING = SamplingConfig(steps=4, guidance=5.0, scheduler="ddim", seed=5, height=16, width=16)


def sd1_like() -> ModelConfig:
    """Tiny config with SD 1.5's block structure: 4 levels, attention in the first 3 (so down_blocks.2,
    up_blocks.1 and the mid block exist, with 2, 3 and 1 attentions)."""
    unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), attention_levels=(True, True, True, False),
                      n_heads=2, context_dim=32)
    return ModelConfig(unet=unet, vae=VAEConfig(block_channels=(32, 64)), text=tiny_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    model = randomize_(StableDiffusion(sd1_like()), seed=0).eval()
    pipe = diffusers_pipeline(model, "ddim")
    adapter = randomize_(IPAdapter(model.unet, embed_dim=EMBED_DIM), seed=1)
    official = {k: v.clone() for k, v in adapter.state_dict().items()}  # editlab names are the official keys
    torch.save({group: {k[len(group) + 1:]: v for k, v in official.items() if k.startswith(group + ".")}
                for group in ("image_proj", "ip_adapter")}, folder / "ip-adapter.bin")
    save_file(official, folder / "ip-adapter.safetensors")
    embeds = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    return model, pipe, folder, official, embeds


def test_processor_table_matches_checkpoints_md():
    with torch.device("meta"):
        unet = UNet(sd15().unet)
        adapter = IPAdapter(unet, embed_dim=1024)
    assert block_table(unet) == {k: name for k, (name, _) in SD15_PROCESSOR_TABLE.items()}
    widths = {int(k): branch.to_k_ip.out_features for k, branch in adapter.ip_adapter.items()}
    assert widths == {k: width for k, (_, width) in SD15_PROCESSOR_TABLE.items()}
    assert adapter.image_proj.proj.weight.shape == (3072, 1024)
    assert 22.0e6 < sum(p.numel() for p in adapter.parameters()) < 22.6e6  # ≈ 22.3M (docs/methods.md §8)


@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_both_file_forms_load_strictly(setup, form):
    model, _, folder, official, _ = setup
    adapter, report = load_ip_adapter(folder / f"ip-adapter.{form}", model.unet)
    assert report.ok and report.filled == len(official)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_wrong_files_are_refused_with_a_report(setup, tmp_path):
    model, _, _, official, _ = setup
    extra = {**official, "ip_adapter.33.to_k_ip.weight": torch.zeros(64, 32)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected.*ip_adapter.33"):
        load_ip_adapter(tmp_path / "extra.safetensors", model.unet)
    missing = {k: v for k, v in official.items() if k != "ip_adapter.31.to_v_ip.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="missing.*ip_adapter.31.to_v_ip"):
        load_ip_adapter(tmp_path / "missing.safetensors", model.unet)
    save_file({"proj.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not an IP-Adapter"):
        load_ip_adapter(tmp_path / "other.safetensors", model.unet)


def _diffusers_latents(pipe, folder, form, scale, embeds):
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=f"ip-adapter.{form}", image_encoder_folder=None)
    try:
        pipe.set_ip_adapter_scale(scale)
        # precomputed embeddings under CFG are chunked (negative, positive); the negative is zeros
        image_embeds = [torch.cat([torch.zeros_like(embeds), embeds])[:, None]]  # [2, 1, D]
        return pipe(prompt=PROMPT, num_inference_steps=SAMPLING.steps, guidance_scale=SAMPLING.guidance,
                    height=SAMPLING.height, width=SAMPLING.width, ip_adapter_image_embeds=image_embeds,
                    generator=torch.Generator("cpu").manual_seed(SAMPLING.seed), output_type="latent").images
    finally:
        pipe.unload_ip_adapter()


@pytest.mark.parametrize("form,scale", [
    ("bin", 0.7),
    ("safetensors", 0.7),
    ("bin", {"up": {"block_1": [1.0, 1.0, 1.0]}}),  # InstantStyle "style" (docs/methods.md §9.1)
    ("bin", {"down": {"block_2": [1.0, 1.0]}, "mid": 1.0, "up": {"block_1": [1.0, 1.0, 1.0]}}),  # style+layout
])
def test_matches_diffusers_load_ip_adapter(setup, form, scale):
    model, pipe, folder, _, embeds = setup
    adapter, _ = load_ip_adapter(folder / f"ip-adapter.{form}", model.unet)
    if isinstance(scale, dict):
        preset = "style+layout" if "down" in scale else "style"
        ours_scale = preset_scales(model.unet, preset, 1.0)
        assert len(ours_scale) == (6 if "down" in scale else 3)
    else:
        ours_scale = scale
    ours = generate_with_image_prompt(model, adapter, embeds, PROMPT, ours_scale, SAMPLING, progress=False)
    reference = _diffusers_latents(pipe, folder, form, scale, embeds)
    assert relative_error(reference, ours) <= 1e-4
    plain = text_to_image(model, PROMPT, SAMPLING, progress=False)
    assert relative_error(plain, ours) > 1e-2  # the image prompt did change the result


def test_scale_zero_everywhere_is_the_plain_model(setup):
    model, _, folder, _, embeds = setup
    adapter, _ = load_ip_adapter(folder / "ip-adapter.bin", model.unet)
    ours = generate_with_image_prompt(model, adapter, embeds, PROMPT, 0.0, SAMPLING, progress=False)
    assert torch.equal(ours, text_to_image(model, PROMPT, SAMPLING, progress=False))
    hook = image_prompt_hook(adapter, embeds, 1, SAMPLING.guidance, {"up.1.0.cross": 0.0, "mid.0.0.cross": 0.5})
    assert hook.scales == {"mid.0.0.cross": 0.5}  # λ = 0 layers get no hook at all


def test_negative_tokens_are_the_projection_of_zeros(setup):
    model, _, folder, _, embeds = setup
    adapter, _ = load_ip_adapter(folder / "ip-adapter.bin", model.unet)
    tokens = adapter.tokens(embeds, guidance=5.0)
    assert tokens.shape == (2, 4, 32)
    expected_negative = adapter.image_proj.norm(adapter.image_proj.proj.bias.view(4, 32))  # LN(W·0 + b)
    assert torch.allclose(tokens[0], expected_negative, atol=1e-6)
    assert tokens[0].abs().max() > 0.1  # not zero tokens


def test_bad_inputs_are_clear_errors(setup):
    model, _, folder, _, embeds = setup
    adapter, _ = load_ip_adapter(folder / "ip-adapter.bin", model.unet)
    with pytest.raises(ValueError, match="width"):
        image_prompt_hook(adapter, torch.zeros(1, EMBED_DIM + 1), 1, 5.0, 1.0)
    with pytest.raises(ValueError, match="expected"):
        image_prompt_hook(adapter, torch.zeros(3, EMBED_DIM), 2, 5.0, 1.0)
    with pytest.raises(ValueError, match="no adapted cross-attention layer"):
        image_prompt_hook(adapter, embeds, 1, 5.0, {"up.0.0.cross": 1.0})
