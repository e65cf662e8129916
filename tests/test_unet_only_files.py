"""UNet-only editlab files (ldm/model.py): a fine-tuned UNet stored beside the base file it shares the VAE
and text encoder with."""

import pytest
import torch

from ldm.config import tiny_sd1
from ldm.model import StableDiffusion, WeightsError, metadata_of


@pytest.fixture
def base_and_tuned(tmp_path):
    torch.manual_seed(0)
    base = StableDiffusion(tiny_sd1())
    base.save(tmp_path / "base.safetensors")
    tuned = StableDiffusion(tiny_sd1())
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.unet.conv_in.weight.add_(1.0)
    return tmp_path, base, tuned


def test_round_trip_takes_vae_and_text_encoder_from_the_base(base_and_tuned):
    folder, base, tuned = base_and_tuned
    tuned.save(folder / "tuned.safetensors", {"note": "x"}, base=folder / "base.safetensors")
    full = folder / "full.safetensors"
    tuned.save(full)
    assert (folder / "tuned.safetensors").stat().st_size < 0.8 * full.stat().st_size
    assert metadata_of(folder / "tuned.safetensors")["vae_text_encoder_file"] == "base.safetensors"
    loaded = StableDiffusion.load(folder / "tuned.safetensors")
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_refuses_a_changed_or_missing_base_and_non_unet_differences(base_and_tuned):
    folder, base, tuned = base_and_tuned
    tuned.save(folder / "tuned.safetensors", base=folder / "base.safetensors")
    with torch.no_grad():
        base.vae.encoder.conv_in.weight.add_(1.0)
    base.save(folder / "base.safetensors")
    with pytest.raises(WeightsError, match="needs its base file"):
        StableDiffusion.load(folder / "tuned.safetensors")
    (folder / "base.safetensors").unlink()
    with pytest.raises(WeightsError, match="needs its base file"):
        StableDiffusion.load(folder / "tuned.safetensors")
    base.save(folder / "base.safetensors")
    with pytest.raises(ValueError, match="only the UNet may differ"):
        tuned.save(folder / "tuned2.safetensors", base=folder / "base.safetensors")
