"""Reading, detection, errors, EMA, prediction type, metadata and the VAE swap of weights_convert, through the
Python API and the ``editlab convert`` command (docs/checkpoints.md §2-§4, §14)."""

import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from editing.cli import main
from ldm.config import VAEConfig, tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion, WeightsError, metadata_of
from tests import peers
from weights_convert import convert, load_converted, sniff_format

CFG = tiny_sd1()


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    """A tiny SD 1 single file (safetensors) with an EMA copy."""
    path = tmp_path_factory.mktemp("ldm") / "tiny-sd1.safetensors"
    save_file(peers.ldm_checkpoint(CFG, seed=0, ema=True), str(path))
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """A standalone VAE in LDM names without prefix (like vae-ft-mse-840000-ema-pruned.ckpt)."""
    path = tmp_path_factory.mktemp("vae") / "vae-ft.ckpt"
    torch.save({"state_dict": peers.random_tensors(peers.ldm_vae_shapes(CFG.vae), seed=7)}, path)
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr().err.strip()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch-zip", "raw-pickle"])
def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, capsys, how):
    marker, path = tmp_path / "pwned", tmp_path / "model.ckpt"
    pickle.loads(pickle.dumps(Evil(tmp_path / "armed")))  # the payload does run when unpickled unsafely
    assert (tmp_path / "armed").exists()
    payload = {"state_dict": {"model.diffusion_model.x": Evil(marker)}}
    if how == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsError, match="refused to unpickle: it would import .*system"):
        convert(path, tmp_path / "out.safetensors")
    code, err = run_cli(capsys, path, tmp_path / "out.safetensors")
    assert code == 2 and "refused to unpickle" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_damaged_and_foreign_files_get_one_line_errors(tmp_path, capsys, ldm_file):
    data = ldm_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:-200])
    (tmp_path / "image.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "notes.safetensors").write_text("this is not a model\n")
    cases = {"cut.safetensors": "damaged or truncated safetensors", "cut.ckpt": "damaged or truncated torch checkpoint",
             "image.ckpt": "a PNG image, not a checkpoint", "notes.safetensors": "a text file, not a checkpoint"}
    for name, message in cases.items():
        with pytest.raises(WeightsError, match=message):
            convert(tmp_path / name, tmp_path / "out.safetensors")
        code, err = run_cli(capsys, tmp_path / name, tmp_path / "out.safetensors")
        assert code == 2 and message in err and len(err.splitlines()) == 1


def test_formats_are_told_apart_by_content_not_extension(tmp_path, ldm_file):
    from safetensors.torch import load_file

    state = load_file(str(ldm_file))
    (tmp_path / "really-safetensors.ckpt").write_bytes(ldm_file.read_bytes())
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "zip.pt")
    formats = {name: sniff_format(tmp_path / name) for name in ("really-safetensors.ckpt", "legacy.safetensors", "zip.pt")}
    assert formats == {"really-safetensors.ckpt": "safetensors", "legacy.safetensors": "torch-legacy", "zip.pt": "torch-zip"}
    for pad in range(256):  # a safetensors header whose length starts with byte 0x80, like a pickle
        save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"pad": "p" * pad})
        if (tmp_path / "x.safetensors").read_bytes()[0] == 0x80:
            break
    assert (tmp_path / "x.safetensors").read_bytes()[0] == 0x80 and sniff_format(tmp_path / "x.safetensors") == "safetensors"
    reference = load_converted(ldm_file, config=CFG).tensors
    for name in formats:
        tensors = load_converted(tmp_path / name, config=CFG).tensors
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_unknown_architectures_are_named(tmp_path, capsys):
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    save_file({"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(2)}, str(tmp_path / "bert.safetensors"))
    code, err = run_cli(capsys, tmp_path / "sdxl.safetensors", tmp_path / "out.safetensors")
    assert code == 2 and "an SDXL / SD 3 checkpoint" in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, tmp_path / "bert.safetensors", tmp_path / "out.safetensors")
    assert code == 2 and "not a Stable Diffusion checkpoint" in err and "encoder.layer.0.weight" in err


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, ldm_file):
    from safetensors.torch import load_file

    state = load_file(str(ldm_file))
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.input_blocks.1.0.mystery.weight"] = torch.zeros(3)
    state["training_loss.weight"] = torch.zeros(3)
    state["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError) as caught:
        load_converted(tmp_path / "broken.safetensors", config=CFG)
    message, report = str(caught.value), caught.value.report
    assert "missing 1 [unet.conv_out.bias]" in message and "unexpected 2 [" in message and "wrong shape 1" in message
    assert report.missing == ["unet.conv_out.bias"]
    assert sorted(report.unexpected) == ["model.diffusion_model.input_blocks.1.0.mystery.weight", "training_loss.weight"]
    assert report.shape_mismatches == {"vae.quant_conv.bias": ((8,), (5,))}
    assert report.ignored["betas"].startswith("LDM training schedule buffer")


def test_metadata_records_the_source_and_the_file_loads_back_in_one_call(tmp_path, ldm_file):
    report = convert(ldm_file, tmp_path / "out.safetensors", config=CFG)
    meta = metadata_of(tmp_path / "out.safetensors")
    assert meta["source"] == "tiny-sd1.safetensors" and meta["source_layout"] == "ldm" and meta["source_family"] == "sd1"
    assert meta["source_sha256"] == hashlib.sha256(ldm_file.read_bytes()).hexdigest()
    assert meta["source_ema"] == "not used" and report.info["ema"] == "not used"
    model = StableDiffusion.load(tmp_path / "out.safetensors")
    assert model.config == CFG
    assert report.ok and report.filled == len(model.state_dict())


def test_ema_choice(tmp_path, capsys, ldm_file):
    """SD 1 defaults to the raw weights, --ema takes model_ema.* (names derived from the raw keys), IP2P
    defaults to EMA, --no-ema forces the raw weights, and --ema on a file without EMA is an error."""
    from safetensors.torch import load_file

    source = load_file(str(ldm_file))
    raw, ema = source["model.diffusion_model.input_blocks.0.0.weight"], source["model_ema.diffusion_modelinput_blocks00weight"]
    assert not torch.equal(raw, ema)
    conv_in = lambda **kw: load_converted(ldm_file, config=CFG, **kw).tensors["unet.conv_in.weight"]
    assert torch.equal(conv_in(), raw) and torch.equal(conv_in(ema=True), ema) and torch.equal(conv_in(ema=False), raw)

    ip2p_path = tmp_path / "ip2p.ckpt"
    torch.save({"state_dict": peers.ldm_checkpoint(tiny_sd1(8), seed=3, ema=True), "global_step": 22000}, ip2p_path)
    ip2p = load_converted(ip2p_path, config=tiny_sd1(8))
    assert ip2p.report.info["ema"] == "used" and ip2p.config.family == "ip2p"
    source = torch.load(ip2p_path, weights_only=True)["state_dict"]
    assert torch.equal(ip2p.tensors["unet.conv_in.weight"], source["model_ema.diffusion_modelinput_blocks00weight"])
    assert ip2p.tensors["unet.conv_in.weight"].shape[1] == 8
    no_ema = load_converted(ip2p_path, config=tiny_sd1(8), ema=False)
    assert torch.equal(no_ema.tensors["unet.conv_in.weight"], source["model.diffusion_model.input_blocks.0.0.weight"])

    plain = tmp_path / "plain.safetensors"
    save_file(peers.ldm_checkpoint(CFG, seed=4), str(plain))
    code, err = run_cli(capsys, plain, tmp_path / "out.safetensors", "--ema", "--config", "tiny-sd1")
    assert code == 2 and "no EMA copy" in err


def test_sd2_single_file_needs_the_prediction_type(tmp_path, capsys):
    path = tmp_path / "sd2.safetensors"
    save_file(peers.ldm_checkpoint(tiny_sd2(), seed=5), str(path))
    cfg = tiny_sd2().replace(prediction_type="epsilon")
    with pytest.raises(WeightsError, match="pass --prediction v_prediction .768-v models. or --prediction epsilon"):
        load_converted(path, prediction=None, config=None)
    assert load_converted(path, config=cfg).config.prediction_type == "epsilon"  # an explicit config says it
    assert load_converted(path, config=cfg, prediction="v_prediction").config == tiny_sd2()
    code, _ = run_cli(capsys, path, tmp_path / "v.safetensors", "--config", "tiny-sd2", "--prediction", "v_prediction")
    assert code == 0 and StableDiffusion.load(tmp_path / "v.safetensors").config == tiny_sd2()


def test_forced_layout_and_model(tmp_path, capsys, ldm_file):
    code, err = run_cli(capsys, ldm_file, tmp_path / "out.safetensors", "--layout", "diffusers")
    assert code == 2 and "needs a folder" in err
    code, err = run_cli(capsys, ldm_file, tmp_path / "out.safetensors", "--config", "tiny-sd1", "--model", "sd2",
                        "--prediction", "epsilon")
    assert code == 2 and "weights do not fit the model" in err and "unexpected" in err  # CLIP-L keys for an SD 2 model
    code, _ = run_cli(capsys, ldm_file, tmp_path / "out.safetensors", "--config", "tiny-sd1", "--layout", "ldm",
                      "--model", "sd1", "--dtype", "fp16")
    assert code == 0 and StableDiffusion.load(tmp_path / "out.safetensors").config == CFG
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.get_tensor("unet.conv_in.weight").dtype == torch.float16


def test_vae_swap(tmp_path, capsys, ldm_file, vae_file):
    """A standalone LDM VAE replaces the model's VAE, during conversion or in an editlab file; a VAE of
    another shape, or a whole model passed as --vae, is refused."""
    base = tmp_path / "base.safetensors"
    convert(ldm_file, base, config=CFG)
    code, _ = run_cli(capsys, base, tmp_path / "swapped.safetensors", "--vae", vae_file)
    assert code == 0
    swapped, original = StableDiffusion.load(tmp_path / "swapped.safetensors"), StableDiffusion.load(base)
    standalone = torch.load(vae_file, weights_only=True)["state_dict"]
    assert torch.equal(swapped.vae.decoder.up_blocks[0].resnets[0].conv1.weight, standalone["decoder.up.1.block.0.conv1.weight"])
    assert torch.equal(swapped.vae.encoder.mid_block.attentions[0].to_q.weight, standalone["encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert all(torch.equal(a, b) for a, b in zip(swapped.unet.state_dict().values(), original.unet.state_dict().values()))
    meta = metadata_of(tmp_path / "swapped.safetensors")
    assert meta["vae_source"] == "vae-ft.ckpt" and meta["source"] == "tiny-sd1.safetensors"  # provenance kept
    assert meta["source_layout"] == "ldm" and meta["source_sha256"] == hashlib.sha256(ldm_file.read_bytes()).hexdigest()
    assert meta["vae_source_sha256"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()
    direct = load_converted(ldm_file, config=CFG, vae=vae_file)  # swapped while converting the single file
    assert torch.equal(direct.tensors["vae.decoder.conv_in.weight"], standalone["decoder.conv_in.weight"])
    assert direct.report.ignored["first_stage_model.decoder.conv_in.weight"] == "VAE replaced by vae-ft.ckpt"

    wide = VAEConfig(block_channels=(32, 96))
    torch.save(peers.random_tensors(peers.ldm_vae_shapes(wide), seed=8), tmp_path / "wide-vae.pt")
    code, err = run_cli(capsys, base, tmp_path / "bad.safetensors", "--vae", tmp_path / "wide-vae.pt")
    assert code == 2 and "wide-vae.pt: weights do not fit the model (layout=vae" in err and "wrong shape" in err
    code, err = run_cli(capsys, base, tmp_path / "bad.safetensors", "--vae", ldm_file)
    assert code == 2 and "not a standalone VAE" in err
    code, err = run_cli(capsys, vae_file, tmp_path / "bad.safetensors")
    assert code == 2 and "is a standalone VAE, not a whole model" in err
    assert not (tmp_path / "bad.safetensors").exists()
