"""Text to image and SDEdit agree with diffusers' pipelines: same weights (a random diffusers folder converted
with weights_convert), same seed, scheduler, steps, guidance and negative prompt -> the same final latents.
diffusers' scheduler is what its users build: ``X.from_config(folder scheduler config)``; editlab reads the same
config from the converted file's metadata."""

import pytest
import torch

from editing.bench.peers import diffusers_scheduler_from_config
from ldm.config import tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, check_image_size, sdedit, text_to_image
from tests.peers import make_diffusers_folder, relative_error
from weights_convert import convert

PROMPTS = ["a photo of a cat on a mat", "a red circle"]
NEGATIVE = ["blurry", "blurry"]


def _converted(tmp_path_factory, cfg, name):
    folder = tmp_path_factory.mktemp(name)
    pipe = make_diffusers_folder(cfg, folder / "diffusers", seed=7)
    convert(folder / "diffusers", folder / "model.safetensors", config=cfg)
    model = StableDiffusion.load(folder / "model.safetensors")
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_config = dict(pipe.scheduler.config)  # what the folder's scheduler_config.json holds
    return model, pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _converted(tmp_path_factory, tiny_sd1(), "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _converted(tmp_path_factory, tiny_sd2(), "sd2")


def _diffusers_latents(pipe, scheduler, cfg: SamplingConfig, prediction_type, **kwargs):
    pipe.scheduler = diffusers_scheduler_from_config(scheduler, pipe.folder_config)
    assert pipe.scheduler.config.prediction_type == prediction_type
    return pipe(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta,
                generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type="latent", **kwargs).images


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("euler-a", 0.0)])
def test_text_to_image_matches_diffusers(sd1, scheduler, eta):
    model, pipe = sd1
    cfg = SamplingConfig(steps=8, guidance=7.5, scheduler=scheduler, eta=eta, seed=11, height=32, width=48)
    ours = text_to_image(model, PROMPTS, cfg, negative=NEGATIVE, progress=False)
    ref = _diffusers_latents(pipe, scheduler, cfg, "epsilon", prompt=PROMPTS, negative_prompt=NEGATIVE,
                             height=32, width=48)
    assert ours.shape == (2, 4, 16, 24)  # the tiny VAE downsamples by 2
    assert relative_error(ref, ours) <= 1e-4


def test_v_prediction_matches_diffusers(sd2):
    model, pipe = sd2
    assert model.config.prediction_type == "v_prediction"  # read from the folder's scheduler config
    cfg = SamplingConfig(steps=8, guidance=5.0, scheduler="ddim", seed=3, height=32, width=32)
    ours = text_to_image(model, PROMPTS, cfg, negative=NEGATIVE, progress=False)
    ref = _diffusers_latents(pipe, "ddim", cfg, "v_prediction", prompt=PROMPTS, negative_prompt=NEGATIVE,
                             height=32, width=32)
    assert relative_error(ref, ours) <= 1e-4


def test_no_guidance_runs_the_conditional_branch_only(sd1):
    model, pipe = sd1
    cfg = SamplingConfig(steps=5, guidance=1.0, scheduler="ddim", seed=2, height=32, width=32)
    ours = text_to_image(model, PROMPTS[:1], cfg, progress=False)
    ref = _diffusers_latents(pipe, "ddim", cfg, "epsilon", prompt=PROMPTS[:1], height=32, width=32)
    assert relative_error(ref, ours) <= 1e-4


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_sdedit_matches_diffusers_img2img(sd1, strength, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    model, pipe = sd1
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.folder_config = pipe.folder_config
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(steps=10, guidance=7.5, scheduler=scheduler, seed=5)
    before = image.clone()
    ours = sdedit(model, image, ["a cat"], strength, cfg, negative="blurry", progress=False)
    ref = _diffusers_latents(img2img, scheduler, cfg, "epsilon", prompt="a cat", negative_prompt="blurry",
                             image=image, strength=strength)
    assert relative_error(ref, ours) <= 1e-4
    assert torch.equal(image, before)  # the caller's tensor is never scaled in place


def test_sizes_must_be_multiples_of_the_vae_factor():
    with pytest.raises(ValueError, match="not a multiple of 8"):
        check_image_size(100, 64, 8)
    check_image_size(96, 64, 8)
