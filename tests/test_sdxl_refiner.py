"""The SDXL refiner: bigG as its only text encoder and an aesthetic score in place of the target size.

A tiny refiner-shaped random model (4 levels, attention only at the middle two, depth 2 also in the middle
block, 48 + 5·8 added numbers) goes through both conversion paths: a diffusers folder written by
``StableDiffusionXLImg2ImgPipeline(text_encoder=None, requires_aesthetics_score=True).save_pretrained`` and an
original single file (bigG at ``conditioner.embedders.0.model.``, checked parameter by parameter against
diffusers' ``from_single_file``). SDEdit equals that pipeline (latents to 1e-4 relative: the batched and
unbatched text paths sum in different orders; images to 2/255 per pixel, the project's tolerance for decoded
images). The full refiner config is counted on the meta device against diffusers.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from editing.cli import main
from ldm.config import sdxl_refiner, tiny_sdxl_refiner
from ldm.images import read_parameters
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, sdedit
from ldm.sdxl import MicroConditioning, encode_prompt
from ldm.unet import TextTime
from tests import peers
from tests.peers_sdxl import make_refiner_pipeline, sgm_refiner_checkpoint
from weights_convert import convert


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner")
    pipe = make_refiner_pipeline(tiny_sdxl_refiner(), folder / "_bpe", seed=4)
    pipe.save_pretrained(folder / "diffusers")
    assert main(["convert", str(folder / "diffusers"), str(folder / "model.safetensors")]) == 0
    return StableDiffusion.load(folder / "model.safetensors"), pipe, folder / "model.safetensors"


@torch.no_grad()
def test_diffusers_folder_converts_to_the_refiner_config(refiner):
    model, pipe, _ = refiner
    assert model.config == tiny_sdxl_refiner() and model.is_sdxl_refiner  # 4 levels, depths, 5 numbers, bigG alone
    prompts = ["a photo of a cat", ""]
    ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, model.tokenizer(prompts))
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    context, pooled = encode_prompt(model, prompts)
    assert context.shape == (2, 77, 48) and peers.relative_error(ref_context, context) <= 1e-5
    assert peers.relative_error(ref_pooled, pooled) <= 1e-5
    g = torch.Generator().manual_seed(0)
    x, ctx, text = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 77, 48, generator=g), torch.randn(2, 48, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 16, 32, 6.0], [96, 128, 0, 0, 2.5]])
    ref = pipe.unet(x, torch.tensor([999, 17]), ctx, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids}).sample
    ours = model.unet(x, torch.tensor([999, 17]), ctx, added=TextTime(text, time_ids))
    assert ref.std() > 0.1 and peers.relative_error(ref, ours) <= 1e-5  # exact fp32 kernels: 0 measured


def _img2img(pipe, cfg, output_type, **kwargs):
    return pipe(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=torch.Generator().manual_seed(cfg.seed),
                output_type=output_type, **kwargs).images


@pytest.mark.parametrize("negative, micro", [
    (None, MicroConditioning()),  # the refiner encodes "" for no negative prompt (no zeroing); scores 6.0 / 2.5
    ("blurry", MicroConditioning(original_size=(96, 64), crop_top_left=(8, 4), aesthetic_score=7.5,
                                 negative_aesthetic_score=1.0)),
])
@torch.no_grad()
def test_sdedit_matches_img2img_with_aesthetic_scores(refiner, negative, micro):
    model, pipe, _ = refiner
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(steps=6, guidance=5.0, scheduler="ddim", seed=3)
    ours = sdedit(model, image, ["a cat"], 0.6, cfg, negative=negative, micro=micro, progress=False)
    kwargs = dict(prompt="a cat", negative_prompt=negative, image=image, strength=0.6,
                  aesthetic_score=micro.aesthetic_score, negative_aesthetic_score=micro.negative_aesthetic_score,
                  **({} if micro.original_size is None else
                     dict(original_size=micro.original_size, crops_coords_top_left=micro.crop_top_left)))
    assert peers.relative_error(_img2img(pipe, cfg, "latent", **kwargs), ours) <= 1e-4
    assert (decode_latents(model, ours) - _img2img(pipe, cfg, "pt", **kwargs)).abs().max() <= 2 / 255
    swapped = MicroConditioning(micro.original_size, micro.crop_top_left, aesthetic_score=micro.negative_aesthetic_score,
                                negative_aesthetic_score=micro.aesthetic_score)
    other = sdedit(model, image, ["a cat"], 0.6, cfg, negative=negative, micro=swapped, progress=False)
    assert peers.relative_error(ours, other) > 1e-3  # the scores reach the UNet, each on its own branch


def test_sdedit_command_records_the_scores_and_refuses_target_size(refiner, tmp_path, weights, capsys):
    _, pipe, path = refiner
    Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    common = ["sdedit", "--weights", str(path), "--image", str(tmp_path / "in.png"), "--prompt", "a cat", "--steps", "4",
              "--strength", "0.5", "--guidance", "5", "--seed", "2"]
    out = tmp_path / "refined.png"
    assert main(common + ["--aesthetic-score", "7", "--negative-aesthetic-score", "2", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["aesthetic_score"] == 7.0 and params["negative_aesthetic_score"] == 2.0
    assert "target_size" not in params and params["negative_zeroed"] is False
    image = torch.from_numpy(np.array(Image.open(tmp_path / "in.png"))).permute(2, 0, 1)[None].float() / 255
    cfg = SamplingConfig(steps=4, guidance=5.0, scheduler="ddim", seed=2)
    ref = _img2img(pipe, cfg, "pt", prompt="a cat", image=image, strength=0.5, aesthetic_score=7.0,
                   negative_aesthetic_score=2.0)
    png = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float() / 255
    assert (png - ref[0]).abs().max() <= 2 / 255
    capsys.readouterr()
    for args, words in ((common + ["--target-size", "32", "48"], ("--target-size", "aesthetic")),
                        (["generate", "--weights", str(weights), "--prompt", "a", "--aesthetic-score", "6"],
                         ("--aesthetic-score", "SDXL"))):
        assert main(args + ["--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err


@torch.no_grad()
def test_refiner_single_file_agrees_with_diffusers_loader(refiner, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModelWithProjection

    cfg = tiny_sdxl_refiner()
    save_file(sgm_refiner_checkpoint(cfg, seed=6), str(tmp_path / "refiner.safetensors"))
    # the tiny model's heads (size 16) and groups are not the refiner's (64): the preset gives what shapes cannot
    report = convert(tmp_path / "refiner.safetensors", tmp_path / "model.safetensors", preset=cfg)
    assert report.ok and report.info["family"] == "sdxl-refiner"
    assert set(report.ignored) == {"conditioner.embedders.0.model.logit_scale"}
    model = StableDiffusion.load(tmp_path / "model.safetensors")
    assert model.config == cfg  # the middle block's depth read from its own blocks, 5 added numbers
    config = str(refiner[2].parent / "diffusers")  # diffusers reads only the configs of this folder
    convert(tmp_path / "refiner.safetensors", tmp_path / "from-folder.safetensors", config=config)  # --config FOLDER
    assert StableDiffusion.load(tmp_path / "from-folder.safetensors").config == cfg
    unet = UNet2DConditionModel.from_single_file(str(tmp_path / "refiner.safetensors"), subfolder="unet",
                                                 config=config, local_files_only=True)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection,
                                                load_single_file_checkpoint(str(tmp_path / "refiner.safetensors")),
                                                subfolder="text_encoder_2", config=config, local_files_only=True)
    for ours, theirs in ((model.unet, unet), (model.text_encoder, text)):
        mine = ours.state_dict()
        for name, value in theirs.state_dict().items():
            if not name.endswith("position_ids"):
                assert torch.equal(mine[name if name in mine else "text_model." + name], value), name


def test_full_refiner_parameter_count_matches_diffusers():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from editing.bench.peers import diffusers_unet_config, transformers_text_config

    cfg = sdxl_refiner()
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        ours = StableDiffusion(cfg)
        unet = UNet2DConditionModel(**diffusers_unet_config(cfg.unet, 128))
        text = CLIPTextModelWithProjection(CLIPTextConfig(**transformers_text_config(cfg.text)))
    assert count(ours.unet) == count(unet) == 2_259_526_660
    assert count(ours.text_encoder) == count(text) == 694_659_840
    assert unet.config.projection_class_embeddings_input_dim == 2560  # 1280 pooled + 5·256
    assert sum("attn2" in name for name in unet.attn_processors) == 44


@torch.no_grad()
def test_sdxl_textual_inversion_file_goes_to_the_refiners_bigG(refiner, tmp_path):
    """An SDXL embedding ({"clip_l", "clip_g"}) on the refiner: its clip_g rows, as diffusers'
    load_textual_inversion into text_encoder_2 / tokenizer_2."""
    import copy

    from inversion.textual_inversion import load_textual_inversion

    _, pipe, path = refiner
    model = StableDiffusion.load(path)  # a fresh copy: loading grows its token table
    g = torch.Generator().manual_seed(5)
    rows = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    save_file(rows, str(tmp_path / "emb.safetensors"))
    token = load_textual_inversion(model, tmp_path / "emb.safetensors", token="<thing>")
    text, tokenizer = copy.deepcopy(pipe.text_encoder_2), copy.deepcopy(pipe.tokenizer_2)
    other = type(pipe)(**{**pipe.components, "text_encoder_2": text, "tokenizer_2": tokenizer})
    other.load_textual_inversion(rows["clip_g"], token=token, text_encoder=text, tokenizer=tokenizer)
    prompt = [f"a photo of {token} on a mat"]
    ref_context, _, ref_pooled, _ = other.encode_prompt(prompt, do_classifier_free_guidance=False)
    context, pooled = encode_prompt(model, prompt)
    assert peers.relative_error(ref_context, context) <= 1e-5 and peers.relative_error(ref_pooled, pooled) <= 1e-5
