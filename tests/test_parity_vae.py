"""editlab's VAE after conversion vs diffusers' AutoencoderKL (random weights, fp32): encode (mean and
log-variance) and decode. Tiny: a diffusers VAE folder swapped into a converted model with --vae, and the same
weights under the old attention names (query/key/value/proj_attn); non-square input. Full SD shapes: converted
in memory, 128×128 image. Measured max|a − b| / max|a|: 0 (bit-identical) tiny and full.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from editing.cli import main
from ldm.config import sd15, tiny_sd1
from ldm.model import StableDiffusion
from ldm.vae import AutoencoderKL
from tests import peers
from weights_convert import assemble
from weights_convert.diffusers_folder import vae_config_from_diffusers
from weights_convert.ldm_vae import convert_vae


def assert_same_vae(reference, ours: AutoencoderKL, image: torch.Tensor, tolerance: float) -> None:
    with torch.no_grad():
        posterior = reference.encode(image).latent_dist
        mine = ours.encode(image)
        assert posterior.mean.std() > 0.01 and posterior.logvar.std() > 0.01
        assert peers.relative_error(posterior.mean, mine.mean) <= tolerance
        assert peers.relative_error(posterior.logvar, mine.logvar) <= tolerance
        decoded = reference.decode(posterior.mean).sample
        assert decoded.shape == image.shape and peers.relative_error(decoded, ours.decode(posterior.mean)) <= tolerance


def test_tiny_vae_swapped_in_from_a_diffusers_folder_and_old_attention_names(tmp_path):
    cfg = tiny_sd1()
    torch.save({"state_dict": peers.ldm_checkpoint(cfg, seed=0)}, tmp_path / "base.ckpt")
    reference = peers.make_diffusers_vae(cfg.vae, seed=5)
    reference.save_pretrained(tmp_path / "vae")
    assert main(["convert", str(tmp_path / "base.ckpt"), str(tmp_path / "model.safetensors"), "--config", "tiny-sd1",
                 "--vae", str(tmp_path / "vae")]) == 0
    image = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert_same_vae(reference, StableDiffusion.load(tmp_path / "model.safetensors").vae, image, 1e-5)

    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v
           for k, v in load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")).items()}
    assert sum(".query." in k for k in old) == 4  # weight and bias, encoder and decoder
    save_file(old, str(tmp_path / "old-vae.safetensors"))
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "old.safetensors"),
                 "--vae", str(tmp_path / "old-vae.safetensors")]) == 0
    assert_same_vae(reference, StableDiffusion.load(tmp_path / "old.safetensors").vae, image, 1e-5)


@pytest.mark.full_size
def test_full_sd_vae_matches_diffusers():
    reference = peers.make_diffusers_vae(sd15().vae, seed=0)
    config = vae_config_from_diffusers(dict(reference.config))
    assert config == sd15().vae
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    tensors, _ = assemble(convert_vae(reference.state_dict()), ours, "sd-vae")
    ours.load_state_dict(tensors, strict=True, assign=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_same_vae(reference, ours.eval(), image, 1e-4)
