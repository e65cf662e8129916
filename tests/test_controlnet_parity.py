"""ControlNet vs diffusers on tiny random weights: ControlNetModel residuals, and the final latents of
StableDiffusionControlNetPipeline (DDIM) with one and two ControlNets, with and without guess mode (diffusers'
logspace ramp). The tiny VAE downsamples 2×, so the hint encoder has one stride-2 conv (hint channels
(16, 32)) in both libraries, and the hint is the image size."""

import pytest
import torch

from controls import Control, ControlNet, controlnet_to_image, guess_mode_scales
from editing.bench.peers import diffusers_components, diffusers_scheduler
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig
from tests.peers import randomize_, relative_error
from weights_convert.controlnet import to_diffusers_config

HINT = (16, 32)
PROMPTS = ["a red circle", "a blue square on green"]


def _pair(model, seed):
    """An editlab ControlNet with random (non-zero) weights and the diffusers ControlNetModel holding them."""
    from diffusers import ControlNetModel

    net = randomize_(ControlNet.from_unet(model.unet, HINT), seed).eval()
    peer = ControlNetModel(**to_diffusers_config(net.control_config))
    peer.load_state_dict(net.state_dict(), strict=True)
    return net, peer.eval()


@pytest.fixture(scope="module")
def setup():
    model = randomize_(StableDiffusion(tiny_sd1()), 0).eval()
    nets = [_pair(model, 1), _pair(model, 2)]
    return model, nets


@pytest.mark.parametrize("guess_mode", [False, True])
@torch.no_grad()
def test_residuals_match_controlnet_model(setup, guess_mode):
    model, [(net, peer), _] = setup
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    hint, t = torch.rand(2, 3, 16, 24, generator=g), torch.tensor([981, 40])
    scales = guess_mode_scales(net.control_config.n_residuals, 0.7) if guess_mode else 0.7
    down, mid = net(x, t, context, hint, scales)
    ref = peer(x, t, context, hint, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
    assert len(down) == len(ref[0]) == 9  # skips; plus the mid residual
    for ours, theirs in zip(down + [mid], list(ref[0]) + [ref[1]]):
        assert relative_error(theirs, ours) <= 1e-5


@pytest.mark.parametrize("n_nets,guess_mode", [(1, False), (1, True), (2, False), (2, True)])
@torch.no_grad()
def test_ddim_latents_match_the_controlnet_pipeline(setup, n_nets, guess_mode):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    model, nets = setup
    nets = nets[:n_nets]
    g = torch.Generator().manual_seed(4)
    hints = [torch.rand(n_nets, 3, 32, 48, generator=g) for _ in nets]  # two ControlNets: one hint per prompt
    scales = [0.8, 0.5][:n_nets]
    cfg = SamplingConfig(steps=5, guidance=6.0, scheduler="ddim", seed=9, height=32, width=48)
    controls = [Control(net, hint, scale) for (net, _), hint, scale in zip(nets, hints, scales)]
    ours = controlnet_to_image(model, controls, PROMPTS, cfg, negative="blurry", guess_mode=guess_mode, progress=False)

    unet, vae, text, tokenizer = diffusers_components(model)
    peers = [peer for _, peer in nets]
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        controlnet=peers[0] if n_nets == 1 else MultiControlNetModel(peers),
        scheduler=diffusers_scheduler("ddim", "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=hints[0] if n_nets == 1 else hints, height=32, width=48, num_inference_steps=5,
               guidance_scale=6.0, negative_prompt=["blurry"] * 2, generator=torch.Generator().manual_seed(9),
               controlnet_conditioning_scale=scales[0] if n_nets == 1 else scales, guess_mode=guess_mode,
               output_type="latent").images
    assert ours.shape == ref.shape == (2, 4, 16, 24)
    assert relative_error(ref, ours) <= 1e-4
