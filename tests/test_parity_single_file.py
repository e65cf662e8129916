"""An LDM single file converted by editlab vs the same file loaded by diffusers' own single-file loader
(``from_single_file`` with a local config folder, offline), for tiny SD 1, SD 2 and InstructPix2Pix (with an
EMA copy) checkpoints in the original key layout with distinct random values per key (docs/checkpoints.md §14 item 4).

The two converted models must agree parameter by parameter (exactly) and in their outputs: UNet, VAE encode
and decode, text encoder. Measured max|a − b| / max|a|: 0 (bit-identical) everywhere.
"""

import pytest
import torch
from safetensors.torch import save_file

from ldm.config import tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion
from tests import peers
from weights_convert import convert


def diffusers_models(path, folder, ema: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel

    kwargs = dict(config=str(folder), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", extract_ema=ema, **kwargs)
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, load_single_file_checkpoint(str(path)),
                                                subfolder="text_encoder", **kwargs)
    return unet, vae, text


def assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every diffusers/transformers parameter equals editlab's of the same name (transformers >= 5.6 drops
    CLIPTextModel's ``text_model.`` level)."""
    mine = ours.state_dict()
    for name, value in theirs.state_dict().items():
        if name.endswith("position_ids"):
            continue
        key = name if name in mine else "text_model." + name
        assert torch.equal(mine[key], value), name
    assert len(mine) == sum(not k.endswith("position_ids") for k in theirs.state_dict())


@pytest.mark.parametrize("make_cfg, ema", [(tiny_sd1, False), (tiny_sd2, False), (lambda: tiny_sd1(8), True)],
                         ids=["sd1", "sd2", "ip2p-ema"])
@torch.no_grad()
def test_single_file_agrees_with_diffusers_loader(tmp_path, make_cfg, ema):
    cfg = make_cfg()
    path = tmp_path / "model.safetensors"
    checkpoint = peers.ldm_checkpoint(cfg, seed=11, ema=ema)
    save_file(checkpoint, str(path))
    convert(path, tmp_path / "editlab.safetensors", config=cfg)  # IP2P: EMA by default
    model = StableDiffusion.load(tmp_path / "editlab.safetensors")
    unet, vae, text = diffusers_models(path, peers.write_diffusers_configs(cfg, tmp_path / "config"), ema)
    for ours, theirs in ((model.unet, unet), (model.vae, vae), (model.text_encoder, text)):
        assert_same_parameters(ours, theirs)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    expected = unet(x, 500, context).sample
    assert expected.std() > 0.1 and peers.relative_error(expected, model.unet(x, 500, context)) <= 1e-5
    image = torch.rand(1, 3, 24, 32, generator=g) * 2 - 1
    posterior = vae.encode(image).latent_dist
    assert peers.relative_error(posterior.mean, model.vae.encode(image).mean) <= 1e-5
    assert peers.relative_error(vae.decode(posterior.mean).sample, model.vae.decode(posterior.mean)) <= 1e-5
    ids = model.tokenizer(["a cat wearing a hat", ""])
    assert peers.relative_error(text(ids).last_hidden_state, model.text_encoder(ids)) <= 1e-5
    if ema:  # the raw weights really differ, so taking the EMA copy is what made them agree
        assert not torch.equal(checkpoint["model.diffusion_model.input_blocks.0.0.weight"], model.unet.conv_in.weight)
