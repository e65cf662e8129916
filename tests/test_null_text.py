"""Null-text inversion: the learning-rate and early-stop schedules, the stop rule itself, a reconstruction at
guidance 7.5 at least 10× better than DDIM inversion's, and a real-image Prompt-to-Prompt edit from it.

The test model is tiny_sd1 made to behave like a trained text-to-image denoiser in the three ways null-text
inversion relies on (documented, deterministic changes to the random weights):
- output layer × 0.1: ε̂ is small and smooth in x, so DDIM inversion at w = 1 round-trips;
- cross-attention output × 10: the prompt matters, so guidance 7.5 pulls the trajectory away;
- text embeddings × 0.1 with the cross-attention keys and values × 10 (the same function): the embedding
  lives at a scale where Adam's fixed step lr = 1e-2 moves it noticeably in the 5 steps a test can afford
  (the method has 50).
"""

import pytest
import torch

from editing.p2p.edit import P2PConfig, edit_real_image, invert_image
from inversion.ddim_inversion import ddim_invert, ddim_reconstruct, inversion_sampler
from inversion.null_text import (NullTextConfig, early_stop_threshold, null_text_inversion, null_text_predictor,
                                 optimise_embedding, step_learning_rate)
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, denoise

PROMPT = "a cat on a mat"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = StableDiffusion(tiny_sd1()).eval()
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(0.1)
        model.unet.conv_out.bias.mul_(0.1)
        final = model.text_encoder.text_model.final_layer_norm
        final.weight.mul_(0.1)
        final.bias.mul_(0.1)
        for name, module in model.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(10.0)
                module.to_k.weight.mul_(10.0)
                module.to_v.weight.mul_(10.0)
    return model


def test_schedules():
    config = NullTextConfig()
    assert step_learning_rate(0, config) == 1e-2 and step_learning_rate(49, config) == pytest.approx(5.1e-3)
    assert early_stop_threshold(0, config) == 1e-5 and early_stop_threshold(49, config) == pytest.approx(9.9e-4)


def test_stop_rule_steps_first_then_stops_below_the_threshold():
    target = torch.full((1, 4, 8), 0.05)

    def loss_of(embedding):
        return (embedding - target).pow(2).mean()

    start = torch.zeros(1, 4, 8)
    embedding, losses = optimise_embedding(loss_of, start, lr=0.01, iterations=10, threshold=5e-4)
    assert 1 < len(losses) < 10
    assert all(loss >= 5e-4 for loss in losses[:-1]) and losses[-1] < 5e-4  # the first loss below stops
    assert loss_of(embedding).item() < losses[-1]  # the Adam step of the stopping iteration was taken
    assert torch.equal(start, torch.zeros(1, 4, 8))  # the caller's tensor is untouched
    _, all_losses = optimise_embedding(loss_of, start, lr=0.01, iterations=10, threshold=0.0)
    assert len(all_losses) == 10 and all_losses[:len(losses)] == losses


def test_reconstruction_is_10x_better_than_ddim_inversion_at_guidance_7_5(model):
    sampler = inversion_sampler(model, 5)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    result = null_text_inversion(model, z0, PROMPT, sampler, NullTextConfig(guidance=7.5))
    nti = (result.reconstruction - z0).pow(2).mean().item()
    pivots = ddim_invert(model, z0, PROMPT, sampler, guidance=1.0)
    ddim = (ddim_reconstruct(model, pivots[-1], PROMPT, sampler, 7.5) - z0).pow(2).mean().item()
    pivots_guided = ddim_invert(model, z0, PROMPT, sampler, guidance=7.5)
    ddim_guided = (ddim_reconstruct(model, pivots_guided[-1], PROMPT, sampler, 7.5) - z0).pow(2).mean().item()
    # measured MSE: null-text 2.4e-4; DDIM inversion at w = 1 then w = 7.5: 3.2e-2; inverted at 7.5: 6.6e-3
    assert nti * 10 <= ddim and nti * 10 <= ddim_guided
    for i, losses in enumerate(result.losses):  # the early-stop rule, step by step
        threshold = early_stop_threshold(i, NullTextConfig())
        assert all(loss >= threshold for loss in losses[:-1]) and (len(losses) == 10 or losses[-1] < threshold)
    assert all(losses[-1] < losses[0] for losses in result.losses)  # each step's optimisation makes progress
    # guided DDIM from z*_N with [∅_i; c] at step i replays the optimised trajectory bit for bit
    cond = model.encode_prompt([PROMPT])
    replay = denoise(sampler, null_text_predictor(model.unet, result.null_embeddings, cond, 7.5, sampler),
                     result.noise, None, progress=False)
    assert torch.equal(replay, result.reconstruction)
    assert all(p.grad is None for p in model.parameters())  # gradients went to ∅ only


def test_real_image_edit_from_null_text_inversion(model):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(steps=3, guidance=7.5, height=16, width=16)
    config = P2PConfig(blend_words=("cat",), blend_start=0.2)
    result, inverted = edit_real_image(model, image, PROMPT, [PROMPT, "a dog on a mat"], sampling, config)
    assert inverted.method == "null-text" and len(inverted.null_embeddings) == 3
    assert torch.equal(result.latents[1], result.latents[0])  # the identity edit, exactly
    reconstruction = inverted.details.reconstruction  # fitted on the same batch layout (3 rows)
    assert (result.latents[0] - reconstruction).abs().max() <= 1e-4 * reconstruction.abs().max()
    assert (result.latents[2] - result.latents[0]).abs().max() > 1e-3 * reconstruction.abs().max()
    ddim = invert_image(model, image, PROMPT, sampling, method="ddim")
    assert ddim.null_embeddings is None and torch.equal(ddim.noise, ddim.details[-1])
    with pytest.raises(ValueError, match="scheduler 'ddim' with eta 0"):
        invert_image(model, image, PROMPT, SamplingConfig(steps=3, scheduler="euler-a"))
