"""Whole runs with every sampler against diffusers' pipelines, on tiny random models converted from diffusers
folders: the folder's scheduler config travels with the weights, so `editlab generate --scheduler X` gives
what `X.from_config(folder scheduler config)` gives in StableDiffusionPipeline (same seed, negative prompt,
non-square size), and `editlab sdedit` what StableDiffusionImg2ImgPipeline gives."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editing.bench.peers import diffusers_scheduler_from_config
from editing.cli import main
from ldm.config import tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, text_to_image
from ldm.schedulers import SAMPLERS
from tests.peers import make_diffusers_folder, relative_error
from weights_convert import convert

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PROMPT, NEGATIVE = "a red circle on a mat", "blurry"
STEPS, HEIGHT, WIDTH = 4, 16, 24  # 4 divides 1000: plms is diffusers' PNDM there


def _folder(tmp_path_factory, cfg, name, scheduler_changes=None):
    root = tmp_path_factory.mktemp(name)
    pipe = make_diffusers_folder(cfg, root / "diffusers", seed=7)
    config_file = root / "diffusers" / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_file.read_text()), **(scheduler_changes or {})}
    config = {k: v for k, v in config.items() if v is not None or k == "trained_betas"}
    config_file.write_text(json.dumps(config))
    convert(root / "diffusers", root / "model.safetensors", config=cfg)
    pipe.set_progress_bar_config(disable=True)
    return root / "model.safetensors", pipe, config


@pytest.fixture(scope="module")
def leading(tmp_path_factory):
    """SD 1.x folder whose scheduler config says "timestep_spacing": "leading"."""
    return _folder(tmp_path_factory, tiny_sd1(), "leading", {"timestep_spacing": "leading"})


@pytest.fixture(scope="module")
def zero_snr(tmp_path_factory):
    """v-prediction folder with "trailing" and rescale_betas_zero_snr (Lin et al.)."""
    return _folder(tmp_path_factory, tiny_sd2(), "zero_snr",
                   {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True})


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def _diffusers_image(pipe, name, config, **kwargs) -> np.ndarray:
    pipe.scheduler = diffusers_scheduler_from_config(name, config)
    return pipe(num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5),
                output_type="np", **kwargs).images[0]


@pytest.mark.parametrize("name", list(SAMPLERS) + ["DPM++ 2M Karras"])
def test_generate_command_equals_diffusers_pipeline(leading, tmp_path, name):
    weights, pipe, config = leading
    out = tmp_path / "x.png"
    assert main(["generate", "--weights", str(weights), "--prompt", PROMPT, "--negative", NEGATIVE, "--steps",
                 str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", "5", "--scheduler", name,
                 "--out", str(out)]) == 0
    ref = _diffusers_image(pipe, name, config, prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH)
    ours = _png(out)
    assert ours.shape == ref.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(ours - ref).max() <= 2 / 255 + 1e-6  # 8-bit rounding of the PNG, plus float rounding
    assert ours.std() > 0.01


@pytest.mark.parametrize("name,phi", [("euler-a", 0.0), ("euler", 0.0), ("dpm++2m", 0.0), ("dpm++2m", 0.7)])
def test_zero_snr_trailing_folder_equals_diffusers(zero_snr, name, phi):
    weights, pipe, config = zero_snr
    model = StableDiffusion.load(weights)
    assert model.scheduler_config["rescale_betas_zero_snr"] and model.scheduler_config["timestep_spacing"] == "trailing"
    cfg = SamplingConfig(steps=STEPS, guidance=7.5, scheduler=name, seed=5, height=HEIGHT, width=WIDTH,
                         guidance_rescale=phi)
    ours = text_to_image(model, [PROMPT], cfg, negative=NEGATIVE, progress=False)
    pipe.scheduler = diffusers_scheduler_from_config(name, config)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
               guidance_scale=7.5, guidance_rescale=phi, generator=torch.Generator("cpu").manual_seed(5),
               output_type="latent").images
    assert relative_error(ref, ours) <= 1e-4  # float rounding over a few UNet calls


def test_flags_override_the_folder_config(zero_snr):
    weights, _, _ = zero_snr
    model = StableDiffusion.load(weights)
    cfg = SamplingConfig(steps=STEPS, scheduler="heun", seed=5, height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="heun cannot sample a zero-terminal-SNR schedule"):
        text_to_image(model, [PROMPT], cfg, progress=False)
    plain = SamplingConfig(steps=STEPS, scheduler="heun", seed=5, height=HEIGHT, width=WIDTH, rescale_zero_snr=False,
                           spacing="linspace")
    assert torch.isfinite(text_to_image(model, [PROMPT], plain, progress=False)).all()


def test_sdedit_command_with_dpm_solver_equals_img2img(leading, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    weights, pipe, config = leading
    source = tmp_path / "in.png"
    pixels = (torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(0)) * 255).round().byte()
    Image.fromarray(pixels.numpy()).save(source)
    out = tmp_path / "out.png"
    assert main(["sdedit", "--weights", str(weights), "--image", str(source), "--prompt", PROMPT, "--negative",
                 NEGATIVE, "--strength", "0.6", "--steps", "5", "--scheduler", "dpm++2m", "--seed", "5",
                 "--out", str(out)]) == 0
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers_scheduler_from_config("dpm++2m", config)
    image = torch.from_numpy(np.asarray(Image.open(source), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = img2img(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.6, num_inference_steps=5,
                  guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert np.abs(_png(out) - ref).max() <= 2 / 255 + 1e-6


def test_unsupported_combination_is_a_one_line_error(leading, tmp_path, capsys):
    weights, _, _ = leading
    code = main(["generate", "--weights", str(weights), "--prompt", PROMPT, "--scheduler", "euler-a", "--karras",
                 "--steps", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Karras σ works with euler, heun, lms" in err[0]
