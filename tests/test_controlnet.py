"""ControlNet model checks (docs/methods.md §7): zero convs leave the UNet unchanged and still learn,
the residual count and shapes, both guess-mode ramps, hint validation, save/load."""

import pytest
import torch

from controls import Control, ControlNet, ControlNetConfig, controlled_unet, guess_mode_scales
from ldm.config import UNetConfig, tiny_sd1
from ldm.schedulers import NoiseSchedule, make_sampler
from ldm.unet import UNet, skip_channels
from tests.peers import randomize_

CFG = tiny_sd1().unet
HINT = (16, 32)  # one stride-2 conv: hint factor 2 = the tiny VAE's factor


def _unet(seed=0):
    return randomize_(UNet(CFG), seed).eval()


def _inputs(seed=1, batch=2, side=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, 77, CFG.context_dim, generator=g)
    hint = torch.rand(batch, 3, 2 * side, 2 * side, generator=g)
    return x, torch.tensor([999, 10][:batch]), context, hint


def test_residual_count_and_shapes():
    net = ControlNet.from_unet(_unet(), HINT, torch.Generator().manual_seed(0))
    x, t, context, hint = _inputs()
    down, mid = net(x, t, context, hint)
    assert net.control_config.n_residuals == len(skip_channels(CFG)) + 1 == 10  # 3 levels: 9 skips + mid
    assert ControlNetConfig(unet=UNetConfig()).n_residuals == 13  # SD: 12 skips + mid
    assert [r.shape[1] for r in down] == skip_channels(CFG)
    assert [r.shape[-1] for r in down] == [8, 8, 8, 4, 4, 4, 2, 2, 2] and mid.shape == (2, 64, 2, 2)
    with pytest.raises(ValueError, match="hint of shape"):
        net(x, t, context, hint[..., :8, :8])
    with pytest.raises(ValueError, match="control scales"):
        net(x, t, context, hint, [1.0] * 3)


@torch.no_grad()
def test_from_unet_copies_the_encoder_and_zero_convs_keep_the_unet_output():
    unet = _unet()
    net = ControlNet.from_unet(unet, HINT, torch.Generator().manual_seed(0))
    for name, value in net.state_dict().items():
        if not name.startswith("controlnet_"):
            assert torch.equal(value, unet.state_dict()[name]), name
    x, t, context, hint = _inputs()
    down, mid = net(x, t, context, hint)
    assert all(r.abs().max() == 0 for r in down) and mid.abs().max() == 0
    assert torch.equal(unet(x, t, context, down, mid), unet(x, t, context))  # exactly the plain UNet


def test_one_step_makes_zero_convs_nonzero_and_the_copy_gets_gradient():
    """The paper's argument: ∂y/∂W_Z = F'(x + Z(c)) ≠ 0, so the zero convs move after one step, and after
    that the copy F' gets gradient through them."""
    unet = _unet().requires_grad_(False)
    net = ControlNet.from_unet(unet, HINT, torch.Generator().manual_seed(0)).train()
    x, t, context, hint = _inputs()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for step in range(2):
        optimizer.zero_grad()
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        loss = (unet(x, t, context, *net(x, t, context, hint)) - target).pow(2).mean()
        loss.backward()
        if step == 0:
            zero_grads = [net.controlnet_mid_block.weight.grad, *(z.weight.grad for z in net.controlnet_down_blocks)]
            assert all(g.abs().max() > 0 for g in zero_grads)
            copy_grad = net.down_blocks[0].resnets[0].conv1.weight.grad
            assert copy_grad is None or copy_grad.abs().max() == 0  # behind zero convs: no gradient yet
        optimizer.step()
        if step == 0:
            assert net.controlnet_mid_block.weight.abs().max() > 0
            assert all(z.weight.abs().max() > 0 for z in net.controlnet_down_blocks)
    assert net.down_blocks[0].resnets[0].conv1.weight.grad.abs().max() > 0  # step 2: the copy learns
    assert net.controlnet_cond_embedding.conv_out.weight.grad.abs().max() > 0  # E's zero conv, via F'


def test_guess_mode_scales_match_both_published_ramps():
    original = guess_mode_scales(13, 1.0, "original")
    assert original[-1] == 1.0 and original[0] == pytest.approx(0.825 ** 12)
    assert original[0] == pytest.approx(0.0994, abs=1e-4)
    assert all(b / a == pytest.approx(1 / 0.825) for a, b in zip(original, original[1:]))
    ours = guess_mode_scales(13, 2.0, "diffusers")
    assert ours[0] == pytest.approx(0.2) and ours[-1] == pytest.approx(2.0)
    assert all(b / a == pytest.approx(10 ** (1 / 12), rel=1e-5) for a, b in zip(ours, ours[1:]))
    assert max(abs(a / 2 - b) / b for a, b in zip(ours, original)) < 0.006  # they differ by ≤ 0.6 %
    with pytest.raises(ValueError, match="guess-mode rule"):
        guess_mode_scales(13, 1.0, "paper")


def test_hint_must_stay_in_unit_range_and_be_rgb():
    net = ControlNet.from_unet(_unet(), HINT)
    x, t, context, hint = _inputs()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Control(net, hint * 2 - 1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        Control(net, hint[:, :1])
    with pytest.raises(ValueError, match="start < end"):
        Control(net, hint, start=0.5, end=0.5)


@torch.no_grad()
def test_guess_mode_leaves_the_unconditional_half_uncontrolled():
    unet = _unet()
    net = randomize_(ControlNet.from_unet(unet, HINT), 3).eval()
    sampler = make_sampler("ddim", NoiseSchedule.scaled_linear(), 4)
    x, t, context, hint = _inputs(batch=1)
    g = torch.Generator().manual_seed(5)
    both = torch.cat([torch.randn(1, 77, CFG.context_dim, generator=g), context])
    predict = controlled_unet(unet, [Control(net, hint)], both, 3.0, sampler, guess_mode=True)
    guided = predict(sampler.scale_model_input(x, 0), sampler.timesteps[0])
    down, mid = net(x, sampler.timesteps[0], context, hint, guess_mode_scales(10))
    uncond = unet(x, sampler.timesteps[0], both[:1])
    cond = unet(x, sampler.timesteps[0], both[1:], down, mid)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    net = randomize_(ControlNet.from_unet(_unet(), HINT), 4)
    net.save(tmp_path / "cn.safetensors")
    loaded = ControlNet.load(tmp_path / "cn.safetensors")
    assert loaded.control_config == net.control_config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())


def test_control_guidance_start_and_end_follow_diffusers():
    """keep_i = 1 − [i/N < start or (i+1)/N > end] (diffusers control_guidance_start / _end)."""
    net = ControlNet.from_unet(_unet(), HINT)
    hint = _inputs()[3]
    assert [Control(net, hint, start=0.5).keep(i, 4) for i in range(4)] == [0, 0, 1, 1]
    assert [Control(net, hint, end=0.5).keep(i, 4) for i in range(4)] == [1, 1, 0, 0]
    assert [Control(net, hint, start=0.2, end=0.8).keep(i, 5) for i in range(5)] == [0, 1, 1, 1, 0]
