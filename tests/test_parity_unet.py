"""editlab's UNet after conversion vs diffusers' UNet2DConditionModel (random weights, fp32).

Tiny SD 1-style, SD 2-style (linear projections, head size) and 8-channel (InstructPix2Pix) models go through
a diffusers folder written by save_pretrained and ``editlab convert``; the full SD 1.5 UNet goes through the
same conversion function in memory. Measured max|a − b| / max|a|: 0 (bit-identical) for the tiny models and
for SD 1.5 (peak RSS 4.6 GB; ~90 s CPU time, most of it the two full-size forwards).
"""

import pytest
import torch
from safetensors.torch import load_file

from editing.cli import main
from ldm.config import sd15, tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion
from ldm.unet import UNet
from tests import peers
from weights_convert import assemble
from weights_convert.diffusers_folder import convert_unet, unet_config_from_diffusers


@pytest.mark.parametrize("make_cfg", [tiny_sd1, tiny_sd2, lambda: tiny_sd1(8)], ids=["sd1", "sd2", "ip2p-8ch"])
@torch.no_grad()
def test_tiny_unet_through_a_diffusers_folder(tmp_path, make_cfg):
    cfg = make_cfg()
    pipeline = peers.make_diffusers_folder(cfg, tmp_path / "folder", seed=1)
    if cfg.unet.in_channels == 8:  # weights as a pickle (.bin) instead of safetensors: read with weights_only
        unet_dir = tmp_path / "folder" / "unet"
        torch.save(load_file(str(unet_dir / "diffusion_pytorch_model.safetensors")), unet_dir / "diffusion_pytorch_model.bin")
        (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "model.safetensors")]) == 0
    model = StableDiffusion.load(tmp_path / "model.safetensors")
    assert model.config == cfg  # heads, projections, family, prediction type and pad id all read from the folder

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, 16, 24, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([999, 17])
    ref = pipeline.unet(x, t, context).sample
    ours = model.unet(x, t, context)
    assert ref.std() > 0.1 and peers.relative_error(ref, ours) <= 1e-5

    image = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    posterior = pipeline.vae.encode(image).latent_dist
    assert peers.relative_error(posterior.mean, model.vae.encode(image).mean) <= 1e-5
    assert peers.relative_error(pipeline.vae.decode(posterior.mean).sample, model.vae.decode(posterior.mean)) <= 1e-5
    ids = pipeline.tokenizer(["a red cube", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, model.tokenizer(["a red cube", ""]))
    assert peers.relative_error(pipeline.text_encoder(ids).last_hidden_state, model.text_encoder(ids)) <= 1e-5


@torch.no_grad()
@pytest.mark.full_size
def test_full_sd15_unet_matches_diffusers():
    """SD 1.5 shapes (859.5 M parameters), 64×64 latents, batch 2, converted in memory by the function the
    folder path uses; the editlab UNet shares the diffusers UNet's tensors (no copy: ~3.5 GB in all)."""
    reference = peers.make_diffusers_unet(sd15().unet, seed=0, sample_size=64)
    config = unet_config_from_diffusers(dict(reference.config))
    assert config == sd15().unet
    with torch.device("meta"):
        unet = UNet(config)
    tensors, report = assemble(convert_unet(reference.state_dict()), unet, "sd15-unet")
    assert report.filled == 686 and not report.ignored
    unet.load_state_dict(tensors, strict=True, assign=True)
    unet.eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([981, 1])
    ref = reference(x, t, context).sample
    ours = unet(x, t, context)
    assert ref.std() > 0.1 and peers.relative_error(ref, ours) <= 1e-4
