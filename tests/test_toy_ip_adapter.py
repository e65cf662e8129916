"""The bundled toy IP-Adapter (ldm/toy/weights/toy-ip-adapter.safetensors, controls/ip_adapter_train.py):
loaded by the IP-Adapter loader with the toy CLIP's image tower as its encoder, the style image's colour
moves the output's colour as the image-branch scale grows (toy readers); and its training resumes exactly."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from controls.ip_adapter import generate_with_image_prompt
from editing.options import TOY_CLIP_WEIGHTS, TOY_IP_ADAPTER_WEIGHTS, TOY_WEIGHTS
from ldm.clip_vision import preprocess
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents
from ldm.toy import COLOURS, ShapeSpec, object_mask, read_colour, render

pytestmark = pytest.mark.skipif(not TOY_IP_ADAPTER_WEIGHTS.is_file(), reason="toy IP-Adapter weights not built")
SEEDS = 8
PROMPT = ""  # the image prompt alone (image variation); a prompt naming another colour wins over it (README)
STYLE = ShapeSpec("square", "green", "white", size=0.42)


@pytest.fixture(scope="module")
def parts():
    from weights_convert.clip_vision import load_image_encoder
    from weights_convert.ip_adapter import load_ip_adapter

    model = StableDiffusion.load(TOY_WEIGHTS)
    adapter, _ = load_ip_adapter(TOY_IP_ADAPTER_WEIGHTS, model.unet)
    encoder, _ = load_image_encoder(TOY_CLIP_WEIGHTS)
    with torch.no_grad():
        embeds = encoder(preprocess(Image.fromarray(render(STYLE)[0]), encoder.config.image_size))
    return model, adapter, embeds


def outcomes(parts, scale: float) -> tuple[list[str | None], float]:
    """(object colour read in each of SEEDS images, median RGB distance of the object to the style colour)."""
    model, adapter, embeds = parts
    cfg = SamplingConfig(steps=20, guidance=5.0, scheduler="ddim", seed=0, height=64, width=64)
    latents = generate_with_image_prompt(model, adapter, embeds, [PROMPT] * SEEDS, scale, cfg, progress=False)
    colours, distances = [], []
    green = np.array(COLOURS[STYLE.colour]) / 255
    for image in decode_latents(model, latents):
        rgb = image.permute(1, 2, 0).double().numpy()  # [3, H, W] in [0, 1] -> [H, W, 3]
        mask = object_mask(rgb)
        colours.append(read_colour(rgb, mask) if mask.any() else None)
        if mask.any():
            distances.append(np.linalg.norm(np.median(rgb[mask], axis=0) - green))
    return colours, float(np.median(distances)) if distances else float("inf")


def test_style_colour_moves_the_output_colour_with_scale(parts):
    """Measured: green in 2, 7, 8 of 8 at scales 0, 0.5, 1; median distance to the style green 0.80, 0.08, 0.07."""
    (none, far), (half, middle), (full, near) = (outcomes(parts, s) for s in (0.0, 0.5, 1.0))
    assert sum(c == "green" for c in none) <= 0.4 * SEEDS, none  # scale 0: the unconditional toy model, any colour
    assert far > 3 * middle and middle >= near, (far, middle, near)  # the object's colour approaches the style's
    assert sum(c == "green" for c in half) >= 0.6 * SEEDS, half
    assert sum(c == "green" for c in full) >= 0.85 * SEEDS, full


def test_training_resumes_to_the_same_weights(tmp_path):
    from controls.ip_adapter_train import AdapterRecipe, train_toy_ip_adapter
    from safetensors.torch import load_file
    from weights_convert.clip_vision import load_image_encoder

    recipe = dataclasses.replace(AdapterRecipe(), pool=32, steps=3, batch=4, warmup=1)
    encoder = load_image_encoder(TOY_CLIP_WEIGHTS)[0]
    whole = train_toy_ip_adapter(tmp_path / "a", TOY_WEIGHTS, encoder, TOY_CLIP_WEIGHTS, recipe)
    train_toy_ip_adapter(tmp_path / "b", TOY_WEIGHTS, encoder, TOY_CLIP_WEIGHTS, recipe, stop_at=1)
    resumed = train_toy_ip_adapter(tmp_path / "b", TOY_WEIGHTS, encoder, TOY_CLIP_WEIGHTS, recipe, resume=True)
    first, second = load_file(str(whole)), load_file(str(resumed))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
