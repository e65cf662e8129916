"""Prompt-to-Prompt end to end on a tiny random model: identity edits are exact, the source row is exactly
the plain generation of the same batch, reweighting by 1 is a no-op, B = 3 with Refine + Reweight + blend,
the attention grid, and input errors.

What "exact" compares (docs/methods.md §1.6 item 5): results depend on the batch size and on the attention kernel at
rounding level. So the source row is compared bit for bit with ``text_to_image`` of the same prompt list
(same batch) with the same kernels (every layer on the explicit path in both runs); against a batch-1
``text_to_image`` with SDPA it agrees to rounding (bound asserted, measured ≈ 2e-6 relative).
"""

from dataclasses import replace

import pytest
import torch

from editing.p2p.edit import P2PConfig, prompt_to_prompt
from editing.p2p.visualize import LABEL_HEIGHT, attention_grid, token_labels
from ldm.attention import attached, attention_layers
from ldm.config import tiny_sd1, tiny_sd2
from ldm.hooks import AttentionHook
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, text_to_image

CFG = SamplingConfig(steps=4, guidance=7.5, height=32, width=32, seed=3)
SOURCE, TARGET = "a cat on a mat", "a dog on a mat"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(tiny_sd1()).eval()


class AllExplicit(AttentionHook):
    """Puts every attention layer on the explicit path and changes nothing."""

    def wants_probabilities(self, layer):
        return True


@pytest.mark.parametrize("config, scheduler", [
    (P2PConfig(mode="swap"), "ddim"),
    (P2PConfig(mode="refine", blend_words=("cat",)), "ddim"),
    (P2PConfig(mode="swap", reweight={"cat": 1.0}, cross_replace=1.0, self_replace=(0.0, 1.0)), "ddim"),
    (P2PConfig(mode="refine", self_replace=(0.0, 1.0), self_min_level=0, blend_words=("mat",)), "euler-a"),
    (P2PConfig(mode="swap"), "ddpm"),
])
def test_editing_with_the_source_prompt_gives_the_source_exactly(model, config, scheduler):
    result = prompt_to_prompt(model, SOURCE, SOURCE, replace(CFG, scheduler=scheduler), config)
    assert torch.equal(result.latents[1], result.latents[0])
    assert torch.equal(result.maps[1], result.maps[0])


def test_source_row_is_the_plain_generation_of_the_same_batch(model):
    config = P2PConfig(self_replace=(0.0, 0.5), blend_words=("cat", "dog"), reweight={"dog": 2.0})
    edit = prompt_to_prompt(model, SOURCE, TARGET, CFG, config, attention_hooks=[AllExplicit()])
    with attached(model.unet, AllExplicit()):
        plain = text_to_image(model, [SOURCE, TARGET], CFG, progress=False)
    assert torch.equal(edit.latents[0], plain[0])  # bit for bit: the controller never touches row 0
    alone = text_to_image(model, [SOURCE], CFG, progress=False)  # batch 1, SDPA in every layer
    assert (edit.latents[0] - alone[0]).abs().max() <= 1e-4 * alone.abs().max()
    untouched = P2PConfig(cross_replace=0.0, self_replace=(0.0, 0.0), store=False)
    no_edit = prompt_to_prompt(model, SOURCE, TARGET, CFG, untouched)
    assert (edit.latents[1] - no_edit.latents[1]).abs().max() > 1e-3 * no_edit.latents.abs().max()  # it edits


def test_reweight_by_one_is_a_no_op(model):
    swap = prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(cross_replace=1.0))
    ones = prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(cross_replace=1.0, reweight={"dog": 1.0, "mat": 1.0}))
    assert torch.equal(ones.latents, swap.latents)
    twice = prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(cross_replace=1.0, reweight={"dog": 3.0}))
    assert torch.equal(twice.latents[0], swap.latents[0])
    assert (twice.latents[1] - swap.latents[1]).abs().max() > 1e-3 * swap.latents.abs().max()


def test_three_prompts_refine_chained_reweight_and_blend(model):
    edits = [SOURCE, "a fluffy cat on a red mat"]
    config = P2PConfig(mode="refine", reweight={"fluffy": 2.0}, blend_words=("cat",), self_replace=(0.0, 0.5),
                       blend_threshold=0.9)  # the random model's maps are nearly flat: 0.3 keeps everything
    result = prompt_to_prompt(model, SOURCE, edits, CFG, config)
    assert result.latents.shape == (3, 4, 16, 16) and result.maps.shape == (3, 8, 8, 77)
    assert torch.equal(result.latents[1], result.latents[0])  # "fluffy" is not in edit 1: untouched identity
    assert (result.latents[2] - result.latents[0]).abs().max() > 0
    assert torch.allclose(result.maps[:2].sum(-1), torch.ones(2, 8, 8), atol=1e-5)  # averaged distributions
    assert (result.maps[2].sum(-1) > 1 + 1e-3).all()  # "fluffy" × 2, not renormalised
    # the blend keeps edit 2 equal to the source outside the union of the "cat" masks at the last step
    blend = result.controller.blend
    masks = blend.masks(result.controller.store.summed_maps(1), (16, 16))
    outside = ~(masks[0, 0] | masks[2, 0])
    assert outside.any() and torch.equal(result.latents[2][:, outside], result.latents[0][:, outside])
    assert (result.latents[2][:, ~outside] != result.latents[0][:, ~outside]).any()


def test_attention_grid_has_one_labelled_tile_per_token(model):
    result = prompt_to_prompt(model, SOURCE, "a hippopotamus on a mat", replace(CFG, steps=2), P2PConfig())
    labels = token_labels(model.tokenizer, "a hippopotamus on a mat")
    assert labels == ["<start>", "a", "hippo", "potam", "us", "on", "a", "mat", "<end>"]
    grid = attention_grid(model.tokenizer, "a hippopotamus on a mat", result.maps[1], tile=40, columns=8)
    assert grid.shape == (3, 2 * (40 + LABEL_HEIGHT), 8 * 40)
    for k in range(len(labels)):
        x, y = (k % 8) * 40, (k // 8) * (40 + LABEL_HEIGHT)
        tile, label = grid[:, y:y + 40, x:x + 40], grid[:, y + 40:y + 40 + LABEL_HEIGHT, x:x + 40]
        assert tile.max() > 0.95, k  # each map is scaled to its own maximum
        assert label.min() < 0.5, k  # dark text on white
    assert grid[:, 40 + LABEL_HEIGHT:, 40:].min() == 1.0  # no tile past the 9th token


def test_bad_inputs_fail_before_sampling_with_the_word_named(model):
    with pytest.raises(ValueError, match="blend word 'zebra'"):
        prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(blend_words=("zebra",)))
    with pytest.raises(ValueError, match=r"only in the edit: \['big'\]"):
        prompt_to_prompt(model, SOURCE, "a big cat on a mat", CFG, P2PConfig(mode="swap"))
    with pytest.raises(ValueError, match="mode 'insert'"):
        P2PConfig(mode="insert")
    with pytest.raises(ValueError, match="map level 5"):
        prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(map_level=5))


def test_sd2_style_model_v_prediction_and_its_own_levels():
    torch.manual_seed(0)
    model = StableDiffusion(tiny_sd2()).eval()  # attention only at levels 1 and 2, head size 16, v-prediction
    result = prompt_to_prompt(model, SOURCE, SOURCE, CFG, P2PConfig(blend_words=("cat",)))
    assert result.map_level == 2 and result.maps.shape == (2, 4, 4, 77)
    assert torch.equal(result.latents[1], result.latents[0])
    assert result.controller.calls_per_step == [len(attention_layers(model.unet))] * CFG.steps


@pytest.mark.parametrize("config", [
    P2PConfig(mode="swap", self_replace=(0.0, 1.0), self_min_level=0),
    P2PConfig(mode="refine", self_replace=(0.0, 0.5), blend_words=("cat",)),
])
def test_self_attention_shortcut_gives_the_explicit_edit(model, config):
    """A_j ← A_0 computed as SDPA(q_0, k_0, V_j) (no map formed) equals replacing the materialised maps."""
    shortcut = prompt_to_prompt(model, SOURCE, TARGET, CFG, config)
    assert any(shortcut.controller.replaced_per_step)
    assert not any(name.endswith(".self") for step in shortcut.controller.explicit_per_step for name in step)
    explicit = prompt_to_prompt(model, SOURCE, TARGET, CFG, config, attention_hooks=[AllExplicit()])
    assert (shortcut.latents - explicit.latents).abs().max() <= 1e-5 * explicit.latents.abs().max()
    assert torch.allclose(shortcut.maps, explicit.maps, atol=1e-5)
    untouched = prompt_to_prompt(model, SOURCE, TARGET, CFG, P2PConfig(mode=config.mode, self_replace=(0.0, 0.0),
                                                                      blend_words=config.blend_words))
    change = (shortcut.latents[1] - untouched.latents[1]).abs().max()
    assert change > 1e-4 * untouched.latents.abs().max()  # the replacement acted, 10× above the tolerance
