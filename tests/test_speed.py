"""Speed switches equal the plain path: fused projections, channels_last, low precision with the VAE in
fp32, torch.backends settings per device, and CUDA-graph replay (a clear error where it cannot apply)."""

import pytest
import torch

from editing.cli import main
from ldm.attention import attached
from ldm.config import tiny_sd1
from ldm.hooks import AttentionHook
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.speed import (CUDA_SETTINGS, CudaGraphUNet, apply_backend_settings, backend_settings,
                       restore_backend_settings)
from ldm.unet import UNet


def _unet_and_inputs(seed=0):
    cfg = tiny_sd1().unet
    torch.manual_seed(seed)
    unet = UNet(cfg).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.context_dim)
    return unet, x, ctx


@torch.no_grad()
def test_fused_projections_equal_the_plain_unet():
    unet, x, ctx = _unet_and_inputs()
    plain = unet(x, 10, ctx)
    fused = unet.fuse_projections()(x, 10, ctx)
    # one GEMM over the stacked [W_q; W_k; W_v] instead of three: the same sums, blocked differently
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(unet.fuse_projections(False)(x, 10, ctx), plain)  # off again: the plain path


@torch.no_grad()
def test_fused_weights_are_held_once_and_saved_as_they_were(tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion(tiny_sd1()).eval()
    model.unet.fuse_projections()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def storage() -> int:  # bytes of every distinct storage behind the weights and the stacked copies
        fused = [t for m in model.unet.modules() for t in (getattr(m, "_fused", None) or ())[1:] if t is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*model.unet.parameters(), *fused]}.values())

    held = storage()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, model.config.unet.context_dim)
    model.unet(x, 10, ctx)  # builds the stacked weights: the projections become views of them
    assert storage() == held  # no second copy of any weight
    model.save(tmp_path / "m.safetensors")  # safetensors refuses shared memory: views are written as copies
    loaded = StableDiffusion.load(tmp_path / "m.safetensors").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in before.items())


@torch.no_grad()
def test_channels_last_equals_the_plain_unet():
    unet, x, ctx = _unet_and_inputs()
    plain = unet(x, 10, ctx)
    nhwc = unet.use_channels_last()(x, 10, ctx)
    assert (nhwc - plain).abs().max() <= 1e-5 * plain.abs().max()  # oneDNN's NHWC kernels round differently


@torch.no_grad()
def test_load_turns_the_switches_on_and_keeps_the_vae_in_fp32(weights):
    plain = StableDiffusion.load(weights)
    low = StableDiffusion.load(weights, dtype=torch.bfloat16)
    assert plain.unet.channels_last and all(layer.fuse for layer in plain.unet.modules() if hasattr(layer, "fuse"))
    assert low.unet.conv_in.weight.dtype == torch.bfloat16 and next(low.text_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in low.vae.parameters())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_latents(low, latents.bfloat16()), decode_latents(plain, latents.bfloat16()))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, plain.config.unet.context_dim)
    ref = plain.unet(x, 10, ctx)
    assert (low.unet(x.bfloat16(), 10, ctx.bfloat16()).float() - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16


def test_backend_settings_per_device_and_the_cpu_path_unchanged():
    assert backend_settings("cpu") == {}
    assert backend_settings("cuda") == CUDA_SETTINGS and backend_settings("cuda:1")["cudnn.benchmark"] is True
    unet, x, ctx = _unet_and_inputs()
    with torch.no_grad():
        plain = unet(x, 10, ctx)
        before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        assert apply_backend_settings("cpu") == {}
        previous = apply_backend_settings("cuda")  # GPU-only flags: the CPU arithmetic is untouched
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.equal(unet(x, 10, ctx), plain)
        restore_backend_settings(previous)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before


def test_cuda_graph_refuses_a_cpu_model_in_one_line(weights, tmp_path, capsys):
    unet, _, _ = _unet_and_inputs()
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        CudaGraphUNet(unet)
    code = main(["generate", "--weights", str(weights), "--prompt", "a red circle", "--steps", "2",
                 "--height", "16", "--width", "16", "--device", "cpu", "--cuda-graph", "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--cuda-graph needs" in err
    assert not (tmp_path / "a.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_cuda_graph_replays_the_plain_unet_call():
    unet, x, ctx = _unet_and_inputs()
    unet, x, ctx = unet.cuda().half(), x.cuda().half(), ctx.cuda().half()
    graphed = CudaGraphUNet(unet)
    for t in (999, 500):
        plain = unet(x, torch.tensor(t, device="cuda"), ctx)
        replay = graphed(x, torch.tensor(t, device="cuda"), ctx)
        assert (replay - plain).abs().max() <= 1e-3 * plain.abs().max()  # fp16; cuDNN may pick other algorithms
    with attached(unet, AttentionHook()), pytest.raises(ValueError, match="cannot replay attention hooks"):
        graphed(x, 10, ctx)
