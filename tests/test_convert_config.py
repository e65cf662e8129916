"""``editlab convert --config`` with a preset or a config file (weights_convert/config_files.py): the original LDM
YAMLs read into the presets' configs, a preset following what the file shows (8 input channels), an 8-channel
single file converting with a preset, a YAML, an editlab JSON or a diffusers config folder to the same tensors as
the diffusers folder of the same model, and a non-standard file converting with its JSON or folder (and, without
one, an error that names the option instead of failing inside GroupNorm)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from editing.cli import main
from ldm.config import TextEncoderConfig, instruct_pix2pix, sd15, sd21_v, tiny_sd1, toy
from ldm.model import WeightsError
from tests import peers
from weights_convert import load_converted
from weights_convert.config_files import read_config

V1 = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    conditioning_key: crossattn
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

V2_V = """
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

CLDM = V1.replace("target: ldm.models.diffusion.ddpm.LatentDiffusion", "target: cldm.cldm.ControlLDM").replace(
    "    unet_config:", """    control_stage_config:
      target: cldm.cldm.ControlNet
      params:
        hint_channels: 3
        model_channels: 320
    unet_config:""").replace("openaimodel.UNetModel", "cldm.ControlledUnetModel")


@pytest.mark.parametrize("text, expected", [
    (V1.format(in_channels=4), sd15()),
    (V1.format(in_channels=8), instruct_pix2pix()),  # InstructPix2Pix's generate.yaml differs in in_channels
    (V2_V, sd21_v()),
    (CLDM.format(in_channels=4), sd15()),  # ControlNet's cldm_v15.yaml: SD 1.5 plus a control stage
])
def test_ldm_yaml_reads_into_the_presets(tmp_path, text, expected):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    found = read_config(path)
    assert (found.unet, found.vae, found.prediction_type, found.family) == \
        (expected.unet, expected.vae, expected.prediction_type, expected.family)
    assert found.text is None  # the YAML names the tower, the weights give its shapes


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.yaml").write_text("model: {params: {unet_config: {}}}")
    with pytest.raises(WeightsError, match="no unet_config.params"):
        read_config(tmp_path / "x.yaml")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(WeightsError, match="neither an editlab config nor a diffusers config.json"):
        read_config(tmp_path / "x.json")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(WeightsError, match="not readable YAML"):
        read_config(tmp_path / "bad.yaml")


def tiny_yaml(cfg) -> str:
    """An LDM YAML for a tiny model (the layout of v1-inference.yaml with tiny numbers)."""
    u, v = cfg.unet, cfg.vae
    resolutions = [2 ** i for i, a in enumerate(u.attention_levels) if a]
    return V1.format(in_channels=u.in_channels).replace("model_channels: 320", f"model_channels: {u.model_channels}") \
        .replace("attention_resolutions: [ 4, 2, 1 ]", f"attention_resolutions: {resolutions}") \
        .replace("channel_mult: [ 1, 2, 4, 4 ]\n        num_heads: 8",
                 f"channel_mult: {list(u.channel_mult)}\n        num_heads: {u.n_heads}") \
        .replace("context_dim: 768", f"context_dim: {u.context_dim}") \
        .replace("ch: 128", f"ch: {v.block_channels[0]}") \
        .replace("ch_mult: [ 1, 2, 4, 4 ]", f"ch_mult: {[c // v.block_channels[0] for c in v.block_channels]}")


def converted(path, capsys, tmp_path, *options):
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.safetensors"
    code = main(["convert", str(path), str(out), *options])
    assert code == 0, capsys.readouterr().err
    return load_file(str(out))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eight_channel_single_file_with_a_preset_or_a_file(tmp_path, capsys):
    cfg = tiny_sd1(8)
    single = tmp_path / "ip2p.safetensors"
    save_file(peers.ldm_checkpoint(cfg, seed=21), str(single))
    # its diffusers folder: diffusers' own single-file loader, saved as a pipeline folder
    from tests.test_parity_single_file import diffusers_models

    folder = peers.write_diffusers_configs(cfg, tmp_path / "folder")
    for name, part in zip(("unet", "vae", "text_encoder"), diffusers_models(single, folder, ema=False)):
        part.save_pretrained(folder / name)
    reference = converted(folder, capsys, tmp_path)

    preset = load_converted(single, preset=tiny_sd1())  # the preset says 4 channels, the file shows 8
    assert preset.config == cfg and preset.config.unet.in_channels == 8 and preset.config.family == "ip2p"
    (tmp_path / "editlab.json").write_text(cfg.to_json())
    configs = peers.write_diffusers_configs(cfg, tmp_path / "configs")
    for option in ("tiny-sd1", tmp_path / "editlab.json", configs, configs / "model_index.json"):
        assert same_tensors(converted(single, capsys, tmp_path, "--config", str(option)), reference), option
    with pytest.raises(WeightsError, match="conv_in"):  # what the preset alone used to do: 4 vs 8 channels
        load_converted(single, config=tiny_sd1())

    # an LDM YAML names CLIP ViT-L, so its text encoder follows CLIP-L's rules (12 heads): a tiny model with them
    cfg12 = cfg.replace(unet=dataclasses.replace(cfg.unet, context_dim=48),
                        text=TextEncoderConfig(width=48, n_layers=2, n_heads=12, mlp_dim=192))
    single12 = tmp_path / "ip2p-12.safetensors"
    save_file(peers.ldm_checkpoint(cfg12, seed=22), str(single12))
    (tmp_path / "generate.yaml").write_text(tiny_yaml(cfg12))
    assert load_converted(single12, config=tmp_path / "generate.yaml").config == cfg12
    assert same_tensors(converted(single12, capsys, tmp_path, "--config", str(tmp_path / "generate.yaml")),
                        load_converted(single12, config=cfg12).tensors)


def test_non_standard_single_file_needs_and_takes_its_config(tmp_path, capsys):
    cfg = toy()  # GroupNorm over 16 (UNet) and 8 (VAE) groups, 4 text heads: nothing the shapes can tell
    single = tmp_path / "toy.safetensors"
    save_file(peers.ldm_checkpoint(cfg, seed=23), str(single))
    assert main(["convert", str(single), str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config FILE" in err and "num_channels" not in err
    expected = load_converted(single, config=cfg).tensors
    (tmp_path / "toy.json").write_text(cfg.to_json())
    configs = peers.write_diffusers_configs(cfg, tmp_path / "configs")
    for option in (tmp_path / "toy.json", configs):
        assert same_tensors(converted(single, capsys, tmp_path, "--config", str(option)), expected), option
    assert main(["convert", str(single), str(tmp_path / "x.safetensors"), "--config", "nowhere"]) == 2
    assert "neither a preset" in capsys.readouterr().err
