"""SDXL components after conversion vs diffusers / transformers / open_clip (random weights, fp32).

A tiny SDXL-shaped model (3 levels, no attention at the first, transformer depths 2 and 3, two text encoders,
text_time conditioning) goes through both real conversion paths: a diffusers folder written by
save_pretrained (``editlab convert`` on the command line) and an original single file in the Stability-AI
layout (checked parameter by parameter against diffusers' own ``from_single_file``). Compared: the UNet with
its added conditioning, both text encoders' penultimate states, the pooled embedding, the tokenizers and the
VAE. Measured max|a − b| / max|a|: 0 (bit-identical) everywhere.

The full SDXL base configuration is built on the meta device and counted against diffusers and
transformers built the same way (no memory is allocated).
"""

import pytest
import torch
from safetensors.torch import save_file

from editing.cli import main
from ldm.config import sdxl_base, tiny_sdxl
from ldm.model import StableDiffusion
from ldm.sdxl import encode_prompt
from ldm.unet import TextTime, UNet
from tests import peers
from tests.peers_sdxl import make_sdxl_folder, open_clip_penultimate_and_pooled, sgm_checkpoint
from weights_convert import convert

PROMPTS = ["a photo of a cat on a mat", "", "A Painting of a CAT (by Monet), 3.5x zoom; Café"]


def _unet_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 24, generator=g)  # non-square
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, cfg.text_2.projection_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 16, 32, 512, 640], [96, 128, 0, 0, 128, 192]])
    return x, torch.tensor([999, 17]), context, pooled, time_ids


@torch.no_grad()
def test_tiny_sdxl_through_a_diffusers_folder(tmp_path):
    cfg = tiny_sdxl()
    pipe = make_sdxl_folder(cfg, tmp_path / "folder", seed=1)
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "model.safetensors")]) == 0
    model = StableDiffusion.load(tmp_path / "model.safetensors")
    assert model.config == cfg  # depths, text_time sizes, both encoders, pad ids, VAE scale read from the folder

    x, t, context, pooled, time_ids = _unet_inputs(cfg)
    ref = pipe.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    ours = model.unet(x, t, context, added=TextTime(pooled, time_ids))
    assert ref.std() > 0.1 and peers.relative_error(ref, ours) <= 1e-5
    other = model.unet(x, t, context, added=TextTime(pooled, time_ids.flip(0)))  # the numbers matter
    assert peers.relative_error(ours, other) > 1e-3

    for tokenizer, mine in ((pipe.tokenizer, model.tokenizer), (pipe.tokenizer_2, model.tokenizer_2)):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, mine(PROMPTS))
    assert model.tokenizer(PROMPTS)[1, 2] == 49407 and model.tokenizer_2(PROMPTS)[1, 2] == 0  # pad: end token / 0
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    ours_context, ours_pooled = encode_prompt(model, PROMPTS)
    assert ref_context.shape == (3, 77, 80) and ref_pooled.shape == (3, 48)
    assert peers.relative_error(ref_context, ours_context) <= 1e-5
    assert peers.relative_error(ref_pooled, ours_pooled) <= 1e-5

    image = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    posterior = pipe.vae.encode(image).latent_dist
    assert peers.relative_error(posterior.mean, model.vae.encode(image).mean) <= 1e-5
    assert peers.relative_error(pipe.vae.decode(posterior.mean).sample, model.vae.decode(posterior.mean)) <= 1e-5
    assert model.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025


def _diffusers_from_single_file(path, folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kwargs = dict(config=str(folder), local_files_only=True)
    checkpoint = load_single_file_checkpoint(str(path))
    return (UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kwargs),
            AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs),
            create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder", **kwargs),
            create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, checkpoint, subfolder="text_encoder_2",
                                                 **kwargs))


def _assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine = ours.state_dict()
    for name, value in theirs.state_dict().items():
        if not name.endswith("position_ids"):
            assert torch.equal(mine[name if name in mine else "text_model." + name], value), name
    assert len(mine) == sum(not k.endswith("position_ids") for k in theirs.state_dict())


@torch.no_grad()
def test_tiny_sdxl_single_file_agrees_with_diffusers_loader(tmp_path):
    cfg = tiny_sdxl()
    checkpoint = sgm_checkpoint(cfg, seed=5)
    save_file(checkpoint, str(tmp_path / "sd_xl.safetensors"))
    report = convert(tmp_path / "sd_xl.safetensors", tmp_path / "model.safetensors", config=cfg)
    assert report.info["family"] == "sdxl" and report.ok
    assert set(report.ignored) == {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                   "conditioner.embedders.1.model.logit_scale"}
    model = StableDiffusion.load(tmp_path / "model.safetensors")
    folder = make_sdxl_folder(cfg, tmp_path / "config")  # its configs only are read
    unet, vae, text_l, text_g = _diffusers_from_single_file(tmp_path / "sd_xl.safetensors", tmp_path / "config")
    for ours, theirs in ((model.unet, unet), (model.vae, vae), (model.text_encoder, text_l),
                         (model.text_encoder_2, text_g)):
        _assert_same_parameters(ours, theirs)
    del folder

    x, t, context, pooled, time_ids = _unet_inputs(cfg, seed=1)
    ref = unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert ref.std() > 0.1 and peers.relative_error(ref, model.unet(x, t, context, added=TextTime(pooled, time_ids))) <= 1e-5
    ids = model.tokenizer_2(PROMPTS)
    hidden = text_g(ids, output_hidden_states=True)
    penultimate, pooled_g = model.text_encoder_2.penultimate_and_pooled(ids)
    assert peers.relative_error(hidden.hidden_states[-2], penultimate) <= 1e-5
    assert peers.relative_error(hidden.text_embeds, pooled_g) <= 1e-5
    # and what sgm computes with open_clip's own modules on the file's tensors (fused in_proj, bare projection)
    from tests.peers import make_open_clip_text
    import dataclasses
    tower = make_open_clip_text(dataclasses.replace(cfg.text_2, n_layers=cfg.text_2.n_layers - 1), 0, 48)
    prefix = "conditioner.embedders.1.model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.items()
                           if k.startswith(prefix) and not k.endswith("logit_scale")})
    sgm_hidden, sgm_pooled = open_clip_penultimate_and_pooled(tower, ids)
    assert peers.relative_error(sgm_hidden, penultimate) <= 1e-5 and peers.relative_error(sgm_pooled, pooled_g) <= 1e-5
    ids_l = model.tokenizer(PROMPTS)
    assert peers.relative_error(text_l(ids_l, output_hidden_states=True).hidden_states[-2],
                                model.text_encoder.penultimate_and_pooled(ids_l)[0]) <= 1e-5


def test_sdxl_base_parameter_counts_match_diffusers_and_transformers():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editing.bench.peers import diffusers_unet_config, diffusers_vae_config, transformers_text_config

    cfg = sdxl_base()
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        ours = StableDiffusion(cfg)
        theirs = {"unet": UNet2DConditionModel(**diffusers_unet_config(cfg.unet, 128)),
                  "vae": AutoencoderKL(**diffusers_vae_config(cfg.vae)),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**transformers_text_config(cfg.text))),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**transformers_text_config(cfg.text_2)))}
    assert count(ours.unet) == count(theirs["unet"]) == 2_567_463_684
    assert count(ours.text_encoder) == count(theirs["text_encoder"]) == 123_060_480
    assert count(ours.text_encoder_2) == count(theirs["text_encoder_2"]) == 694_659_840
    assert count(ours.vae) == count(theirs["vae"]) == 83_653_863
    cross = [n for n, _ in theirs["unet"].attn_processors.items() if "attn2" in n]
    assert len(cross) == 70 and sum(m.kind == "cross" for m in ours.unet.modules() if hasattr(m, "kind")) == 70


def test_sdxl_needs_its_added_conditioning():
    unet = UNet(tiny_sdxl().unet)
    x, t, context, pooled, time_ids = _unet_inputs(tiny_sdxl())
    with pytest.raises(ValueError, match="needs its added conditioning"):
        unet(x, t, context)
    with pytest.raises(ValueError, match="added conditioning for 1 rows"):
        unet(x, t, context, added=TextTime(pooled[:1], time_ids[:1]))
