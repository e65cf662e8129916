"""Released ControlNet layouts -> editlab (docs/checkpoints.md §10): original v1.0 files (a whole SD bundled, only
control_model.* taken, the rest reported as ignored), v1.1 files (control_model.* only), and diffusers
ControlNetModel folders. The original checkpoints are written from the original module structure (tests/peers
shapes + cldm.py's hint block and zero convs), and the reference weights come from diffusers' own converter
(loaders.single_file_utils.convert_controlnet_checkpoint), so the two rule sets are independent."""

import pytest
import torch
from safetensors.torch import save_file

from controls import ControlNet
from controls.controlnet import ControlNetConfig
from editing.cli import main
from ldm.config import tiny_sd1
from ldm.unet import skip_channels
from tests.peers import ldm_checkpoint, ldm_unet_shapes, random_tensors, relative_error
from weights_convert import convert
from weights_convert.controlnet import to_diffusers_config

CFG = tiny_sd1()
HINT = (16, 32, 96, 256)  # the released hint block: input_hint_block.{0, 2, ..., 14}


def original_controlnet(seed: int) -> dict[str, torch.Tensor]:
    """control_model.* tensors of cldm.py's ControlNet for the tiny UNet."""
    shapes = {k: s for k, s in ldm_unet_shapes(CFG.unet).items()
              if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    convs = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256), (256, CFG.unet.model_channels)]
    for n, (c_in, c_out) in enumerate(convs):  # Sequential: conv, SiLU, conv, SiLU, ..., zero conv
        shapes.update({f"input_hint_block.{2 * n}.weight": (c_out, c_in, 3, 3),
                       f"input_hint_block.{2 * n}.bias": (c_out,)})
    for i, ch in enumerate(skip_channels(CFG.unet)):
        shapes.update({f"zero_convs.{i}.0.weight": (ch, ch, 1, 1), f"zero_convs.{i}.0.bias": (ch,)})
    mid = CFG.unet.level_channels[-1]
    shapes.update({"middle_block_out.0.weight": (mid, mid, 1, 1), "middle_block_out.0.bias": (mid,)})
    return random_tensors(shapes, seed, "control_model.")


def diffusers_reference(state: dict[str, torch.Tensor]):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = to_diffusers_config(ControlNetConfig(unet=CFG.unet, hint_channels=HINT))
    peer = ControlNetModel(**config)
    converted = convert_controlnet_checkpoint(dict(state), {"layers_per_block": CFG.unet.layers_per_level})
    peer.load_state_dict(converted, strict=True)
    return peer.eval()


@torch.no_grad()
def _assert_same_residuals(net: ControlNet, peer):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, CFG.unet.context_dim, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)  # 8× the latent: three stride-2 convs
    down, mid = net(x, torch.tensor([500]), context, hint)
    ref_down, ref_mid = peer(x, torch.tensor([500]), context, hint, return_dict=False)
    for ours, theirs in zip(down + [mid], list(ref_down) + [ref_mid]):
        assert relative_error(theirs, ours) <= 1e-5


def test_v10_file_with_bundled_sd(tmp_path):
    control = original_controlnet(1)
    torch.save({"state_dict": {**ldm_checkpoint(CFG, seed=5), **control}}, tmp_path / "control_sd15_canny.pth")
    report = convert(tmp_path / "control_sd15_canny.pth", tmp_path / "cn.safetensors", config=CFG)
    assert report.filled == len(control)
    assert any(k.startswith("model.diffusion_model.") for k in report.ignored)
    assert any(k.startswith("first_stage_model.") for k in report.ignored)
    assert not any(k.startswith("control_model.") for k in report.ignored)
    net = ControlNet.load(tmp_path / "cn.safetensors")
    assert net.control_config == ControlNetConfig(unet=CFG.unet, hint_channels=HINT)
    _assert_same_residuals(net, diffusers_reference(control))


def test_v11_file_through_the_cli(tmp_path):
    control = original_controlnet(2)
    save_file(control, str(tmp_path / "control_v11p_sd15_canny.safetensors"))
    assert main(["convert", str(tmp_path / "control_v11p_sd15_canny.safetensors"), str(tmp_path / "cn.safetensors"),
                 "--config", "tiny-sd1"]) == 0
    _assert_same_residuals(ControlNet.load(tmp_path / "cn.safetensors"), diffusers_reference(control))


def test_diffusers_folder_and_missing_keys(tmp_path):
    control = original_controlnet(3)
    peer = diffusers_reference(control)
    peer.save_pretrained(tmp_path / "controlnet")
    convert(tmp_path / "controlnet", tmp_path / "cn.safetensors")  # config from config.json, heads included
    net = ControlNet.load(tmp_path / "cn.safetensors")
    assert net.control_config == ControlNetConfig(unet=CFG.unet, hint_channels=HINT)
    assert all(torch.equal(v, peer.state_dict()[k]) for k, v in net.state_dict().items())
    del control["control_model.zero_convs.3.0.weight"]
    save_file(control, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 \[controlnet_down_blocks.3.weight\]"):
        convert(tmp_path / "broken.safetensors", tmp_path / "broken-out.safetensors", config=CFG)
