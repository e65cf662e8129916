"""The bundled toy CLIP (ldm/toy/weights/toy-clip.safetensors, ldm/toy/clip.py): it loads through the
project's CLIP loader, its locked text tower is exactly the toy model's text encoder, its image tower loads
as IP-Adapter's image encoder with open_clip's numbers, it reads colour and shape zero-shot, and its
training resumes to the same bits."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from ldm.clip_models import clip_image_features, clip_text_features, load_clip
from editing.options import TOY_CLIP_WEIGHTS, TOY_WEIGHTS
from ldm.model import StableDiffusion, metadata_of
from ldm.tokenizer import EOS
from ldm.toy.clip import ClipRecipe, pixels, render_images, train_toy_clip, zero_shot_accuracy

pytestmark = pytest.mark.skipif(not TOY_CLIP_WEIGHTS.is_file(), reason="toy CLIP weights not built")


@pytest.fixture(scope="module")
def clip():
    return load_clip(TOY_CLIP_WEIGHTS, None, text_tower=True)


def test_zero_shot_colour_and_shape_are_well_above_chance(clip):
    images, specs = render_images(300, seed=2024)  # not the training (4321) or the recorded eval (98765) seed
    accuracy = zero_shot_accuracy(clip, images, specs)
    # chance: 1/6 for colours, 1/5 for shapes; the shipped file records 512 other held-out images
    assert accuracy["colour"] >= 0.9, accuracy
    assert accuracy["shape"] >= 0.38, accuracy  # measured 0.48 on the recorded 512: the weak attribute
    assert accuracy["background"] >= 0.9, accuracy
    recorded = json.loads(metadata_of(TOY_CLIP_WEIGHTS)["zero_shot_accuracy"])
    assert abs(recorded["colour"] - accuracy["colour"]) < 0.1 and abs(recorded["shape"] - accuracy["shape"]) < 0.15


def test_text_tower_is_the_toy_models_text_encoder(clip):
    """open_clip's tower on the converted weights gives the toy text encoder's states: the EOS state after
    ln_final, projected, equals the editlab encoder's EOS state times the same projection."""
    model = StableDiffusion.load(TOY_WEIGHTS)
    captions = ["a red circle on a blue background", "a white cross on a purple background"]
    with torch.no_grad():
        ours = model.encode_prompt(captions)  # [2, 77, 64]
        eos = (model.tokenizer(captions) == EOS).int().argmax(1)  # the first end token
        expected = ours[torch.arange(2), eos] @ clip.text_projection
        got = clip_text_features(clip, captions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # fp32, same kernels up to attention layout


def test_image_tower_loads_as_ip_adapter_image_encoder(clip):
    """The same file through weights_convert's image-encoder loader (editlab's ViT) gives open_clip's image
    embeddings on the same pixels."""
    from weights_convert.clip_vision import load_image_encoder

    encoder, report = load_image_encoder(TOY_CLIP_WEIGHTS)
    images, _ = render_images(4, seed=7)
    with torch.no_grad():
        ours = encoder.float()(pixels(images))
        theirs = clip.encode_image(pixels(images))
        via_loader = clip_image_features(clip, images.float() / 255)  # the resize to 64 is the identity
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # two attention implementations, fp32
    torch.testing.assert_close(via_loader, theirs, atol=1e-4, rtol=1e-4)


def test_training_resumes_to_the_same_weights(tmp_path):
    recipe = dataclasses.replace(ClipRecipe(), pool=64, steps=4, batch=16, warmup=1)
    whole = train_toy_clip(tmp_path / "a", TOY_WEIGHTS, recipe)
    train_toy_clip(tmp_path / "b", TOY_WEIGHTS, recipe, stop_at=2)
    resumed = train_toy_clip(tmp_path / "b", TOY_WEIGHTS, recipe, resume=True)
    from safetensors.torch import load_file

    first, second = load_file(str(whole)), load_file(str(resumed))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual.proj"], load_clip(TOY_CLIP_WEIGHTS, None).visual.proj.detach())


def test_toy_weight_files_stay_small():
    sizes = {p.name: p.stat().st_size for p in TOY_WEIGHTS.parent.glob("*.safetensors")}
    assert sizes["toy-clip.safetensors"] < 1.5e6, sizes
    assert sum(sizes.values()) < 25e6, sizes  # the budget for everything bundled
