"""SDXL text to image and SDEdit agree with diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline: a random tiny SDXL diffusers folder converted by weights_convert, the same
seed, scheduler, steps, guidance, negative prompt and size/crop micro-conditioning -> the same latents (1e-4
relative: summation order differs between the batched and unbatched text paths) and the same decoded
images within 2/255 per pixel. Sizes are non-square; the micro-conditioning is not the default.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from editing.cli import main
from ldm.images import read_parameters

from editing.bench.peers import diffusers_scheduler_from_config
from ldm.config import tiny_sdxl
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, sdedit, text_to_image
from ldm.sdxl import MicroConditioning
from tests.peers import relative_error
from tests.peers_sdxl import make_sdxl_folder
from weights_convert import convert

PROMPTS = ["a photo of a cat on a mat", "a red circle"]
MICRO = MicroConditioning(original_size=(96, 64), crop_top_left=(8, 4), target_size=(40, 56))
DIFFUSERS_MICRO = dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(40, 56))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = make_sdxl_folder(tiny_sdxl(), folder / "diffusers", seed=3)
    convert(folder / "diffusers", folder / "model.safetensors")  # records the folder's scheduler config
    pipe.folder_scheduler_config = dict(pipe.scheduler.config)
    return StableDiffusion.load(folder / "model.safetensors"), pipe, folder / "model.safetensors"


def _diffusers(pipe, cfg: SamplingConfig, output_type="latent", **kwargs):
    # what a diffusers user gets by swapping the folder's scheduler, which editlab's samplers also follow
    pipe.scheduler = diffusers_scheduler_from_config(cfg.scheduler, pipe.folder_scheduler_config)
    return pipe(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta,
                generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type=output_type, **kwargs).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
@torch.no_grad()
def test_text_to_image_matches_stable_diffusion_xl_pipeline(sdxl, scheduler):
    model, pipe, _ = sdxl
    cfg = SamplingConfig(steps=6, guidance=5.0, scheduler=scheduler, seed=11, height=32, width=48)
    ours = text_to_image(model, PROMPTS, cfg, negative=["blurry", "dark"], micro=MICRO, progress=False)
    ref = _diffusers(pipe, cfg, prompt=PROMPTS, negative_prompt=["blurry", "dark"], height=32, width=48,
                     **DIFFUSERS_MICRO)
    assert ours.shape == (2, 4, 16, 24) and relative_error(ref, ours) <= 1e-4
    images = _diffusers(pipe, cfg, "pt", prompt=PROMPTS, negative_prompt=["blurry", "dark"], height=32, width=48,
                        **DIFFUSERS_MICRO)
    assert (decode_latents(model, ours) - images).abs().max() <= 2 / 255
    default = text_to_image(model, PROMPTS, cfg, negative=["blurry", "dark"], progress=False)
    assert relative_error(ours, default) > 1e-3  # the micro-conditioning reaches the UNet


@torch.no_grad()
def test_no_negative_prompt_is_zero_conditioning_and_empty_is_encoded(sdxl):
    model, pipe, _ = sdxl
    cfg = SamplingConfig(steps=4, guidance=6.0, scheduler="ddim", seed=2, height=48, width=32)
    zeroed = text_to_image(model, PROMPTS[:1], cfg, negative=None, progress=False)
    assert relative_error(_diffusers(pipe, cfg, prompt=PROMPTS[:1], height=48, width=32), zeroed) <= 1e-4
    empty = text_to_image(model, PROMPTS[:1], cfg, negative="", progress=False)
    ref = _diffusers(pipe, cfg, prompt=PROMPTS[:1], negative_prompt="", height=48, width=32)
    assert relative_error(ref, empty) <= 1e-4 and relative_error(zeroed, empty) > 1e-3


@torch.no_grad()
def test_no_guidance_matches(sdxl):
    model, pipe, _ = sdxl
    cfg = SamplingConfig(steps=4, guidance=1.0, scheduler="ddim", seed=5, height=32, width=32)
    ours = text_to_image(model, PROMPTS[:1], cfg, micro=MICRO, progress=False)
    assert relative_error(_diffusers(pipe, cfg, prompt=PROMPTS[:1], height=32, width=32, **DIFFUSERS_MICRO), ours) <= 1e-4


@pytest.mark.parametrize("strength", [0.4, 0.9])
@torch.no_grad()
def test_sdedit_matches_stable_diffusion_xl_img2img(sdxl, strength):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    model, pipe, _ = sdxl
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.folder_scheduler_config = pipe.folder_scheduler_config
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(steps=8, guidance=5.0, scheduler="ddim", seed=5)
    ours = sdedit(model, image, ["a cat"], strength, cfg, negative="blurry", micro=MICRO, progress=False)
    kwargs = dict(prompt="a cat", negative_prompt="blurry", image=image, strength=strength, **DIFFUSERS_MICRO)
    assert relative_error(_diffusers(img2img, cfg, **kwargs), ours) <= 1e-4
    assert (decode_latents(model, ours) - _diffusers(img2img, cfg, "pt", **kwargs)).abs().max() <= 2 / 255


def test_generate_command_with_micro_conditioning(sdxl, tmp_path, weights, capsys):
    _, pipe, path = sdxl
    out = tmp_path / "xl.png"
    assert main(["generate", "--weights", str(path), "--prompt", PROMPTS[0], "--negative", "blurry", "--steps", "6",
                 "--guidance", "5", "--seed", "11", "--height", "32", "--width", "48", "--original-size", "96", "64",
                 "--crop-top-left", "8", "4", "--target-size", "40", "56", "--out", str(out)]) == 0
    cfg = SamplingConfig(steps=6, guidance=5.0, scheduler="ddim", seed=11)
    ref = _diffusers(pipe, cfg, "pt", prompt=PROMPTS[0], negative_prompt="blurry", height=32, width=48, **DIFFUSERS_MICRO)
    png = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float() / 255
    assert (png - ref[0]).abs().max() <= 2 / 255
    params = read_parameters(out)
    assert params["original_size"] == [96, 64] and params["crop_top_left"] == [8, 4]
    assert params["target_size"] == [40, 56] and params["negative_zeroed"] is False
    capsys.readouterr()
    code = main(["generate", "--weights", str(weights), "--prompt", "a", "--steps", "2", "--height", "16",
                 "--width", "16", "--crop-top-left", "0", "8", "--out", str(tmp_path / "sd1.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--crop-top-left" in err[0] and "SDXL" in err[0]
