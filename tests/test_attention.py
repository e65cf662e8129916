"""The attention module: both paths agree, chunking is invisible, hooks see and edit what they should."""

import pytest
import torch

from ldm.attention import Attention, attached, attention_layers
from ldm.config import sd15, sd21_v, tiny_sd1
from ldm.hooks import AttentionHook
from ldm.unet import UNet


def _layer(context_dim=None, seed=0):
    torch.manual_seed(seed)
    return Attention(64, n_heads=4, head_dim=16, context_dim=context_dim, name="test.0.0.x")


class Recorder(AttentionHook):
    """Asks for probabilities and keeps every chunk it is shown."""

    def __init__(self):
        self.chunks = []

    def wants_probabilities(self, layer):
        return True

    def edit_probabilities(self, layer, probs, rows):
        self.chunks.append((rows, probs.detach().clone()))
        return probs


@pytest.mark.parametrize("context_dim", [None, 24])
@pytest.mark.parametrize("chunk", [1024, 7])
def test_explicit_path_equals_sdpa(context_dim, chunk):
    layer = _layer(context_dim)
    x = torch.randn(2, 50, 64)
    ctx = torch.randn(2, 11, context_dim) if context_dim else None
    fast = layer(x, ctx)
    layer.query_chunk = chunk
    recorder = Recorder()
    layer.hooks.append(recorder)
    slow = layer(x, ctx)
    assert (fast - slow).abs().max() < 1e-5 * fast.abs().max()
    # the chunks cover every query exactly once and each row is a distribution over the keys
    covered = torch.cat([torch.arange(50)[rows] for rows, _ in recorder.chunks])
    assert covered.tolist() == list(range(50))
    probs = torch.cat([p for _, p in recorder.chunks], dim=2)
    assert probs.shape == (2, 4, 50, 11 if context_dim else 50)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 50), atol=1e-6)


def test_explicit_path_matches_the_formula():
    layer = _layer()
    x = torch.randn(1, 9, 64)
    q, k, v = (t.view(1, 9, 4, 16).transpose(1, 2) for t in (layer.to_q(x), layer.to_k(x), layer.to_v(x)))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v  # softmax(QKᵀ/√16) V
    expected = layer.to_out[0](expected.transpose(1, 2).reshape(1, 9, 64))
    layer.hooks.append(Recorder())
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_paths_are_finite_and_close(dtype):
    layer = _layer(24)
    low = _layer(24).to(dtype)
    for scale, tolerance in ((1.0, 0.03), (30.0, None)):  # moderate logits, then huge ones (near one-hot)
        x, ctx = torch.randn(2, 40, 64) * scale, torch.randn(2, 11, 24) * scale
        fast = low(x.to(dtype), ctx.to(dtype)).float()
        low.hooks.append(Recorder())
        slow = low(x.to(dtype), ctx.to(dtype)).float()
        low.hooks.clear()
        assert torch.isfinite(fast).all() and torch.isfinite(slow).all()
        if tolerance:
            ref = layer(x, ctx)
            assert (fast - ref).abs().max() < tolerance * ref.abs().max()
            assert (slow - ref).abs().max() < tolerance * ref.abs().max()


def test_edited_probabilities_change_the_output():
    layer = _layer(24)
    x, ctx = torch.randn(1, 10, 64), torch.randn(1, 5, 24)

    class OnlyFirstKey(Recorder):
        def edit_probabilities(self, layer, probs, rows):
            edited = torch.zeros_like(probs)
            edited[..., 0] = 1.0
            return edited

    with attached(layer, OnlyFirstKey(), select=lambda l: True):
        out = layer(x, ctx)
    v0 = layer.to_v(ctx)[:, :1]  # every query now returns the value of key 0
    assert torch.allclose(out, layer.to_out[0](v0.expand(1, 10, 64)), atol=1e-6)
    assert layer.hooks == []  # detached after the block


def test_extra_output_is_added_and_gradients_flow():
    layer = _layer(24)
    x, ctx = torch.randn(1, 10, 64), torch.randn(1, 5, 24)
    extra_kv = torch.randn(1, 4, 3, 16, requires_grad=True)

    class ExtraBranch(AttentionHook):
        def extra_output(self, layer, q, attend):
            return 0.5 * attend(q, extra_kv, extra_kv)

    base = layer(x, ctx)
    layer.hooks.append(ExtraBranch())
    out = layer(x, ctx)
    q = layer.to_q(x).view(1, 10, 4, 16).transpose(1, 2)
    branch = torch.softmax(q @ extra_kv.transpose(-1, -2) / 4.0, -1) @ extra_kv
    expected_delta = layer.to_out[0](0.5 * branch.transpose(1, 2).reshape(1, 10, 64)) - layer.to_out[0].bias
    assert torch.allclose(out - base, expected_delta, atol=1e-5)
    out.sum().backward()
    assert extra_kv.grad is not None and extra_kv.grad.abs().sum() > 0


def test_sd15_layer_names_and_order():
    with torch.device("meta"):
        unet = UNet(sd15().unet)
    names = list(attention_layers(unet))
    assert len(names) == 32  # 16 transformer blocks × (self, cross)
    assert names[:4] == ["down.0.0.self", "down.0.0.cross", "down.0.1.self", "down.0.1.cross"]
    assert "mid.0.0.cross" in names and "up.1.0.self" in names and "up.0.0.self" not in names
    levels = [attention_layers(unet)[n].level for n in names if n.endswith("cross")]
    assert levels == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    heads = {attention_layers(unet)[n].head_dim for n in names}
    assert heads == {40, 80, 160}  # 8 heads at 320/640/1280 channels


def test_sd2_heads_come_from_head_size():
    with torch.device("meta"):
        unet = UNet(sd21_v().unet)
    assert sorted({l.n_heads for l in attention_layers(unet).values()}) == [5, 10, 20]
    assert {l.head_dim for l in attention_layers(unet).values()} == {64}


def test_hooked_unet_counts_calls_and_matches_unhooked():
    cfg = tiny_sd1().unet
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.context_dim)
    with torch.no_grad():
        plain = unet(x, 10, ctx)
        recorder = Recorder()
        with attached(unet, recorder, select=lambda l: l.kind == "cross"):
            hooked = unet(x, 10, ctx)
    assert (plain - hooked).abs().max() < 1e-5
    assert len(recorder.chunks) == sum(1 for n in attention_layers(unet) if n.endswith("cross"))


def test_selecting_an_unknown_layer_is_an_error():
    unet = UNet(tiny_sd1().unet)
    with pytest.raises(ValueError, match="no attention layer named"):
        with attached(unet, Recorder(), select=["up.9.0.cross"]):
            pass


def test_hooks_must_subclass_the_base_and_attach_once():
    layer = _layer()
    with pytest.raises(TypeError, match="subclass ldm.hooks.AttentionHook"):
        with attached(layer, object(), select=lambda l: True):
            pass
    hook = Recorder()
    with attached(layer, hook, select=lambda l: True):
        with pytest.raises(ValueError, match="already attached"):
            with attached(layer, hook, select=lambda l: True):
                pass
    assert hook.attachment is None and layer.hooks == []
    base = AttentionHook()  # every method a no-op: the plain layer
    x = torch.randn(2, 9, 64)
    with attached(layer, base, select=lambda l: True):
        assert torch.equal(layer(x), _layer()(x))


class CopyRow(AttentionHook):
    """Replaces whole maps: row r attends with the map of row sources[r]."""

    def __init__(self, sources):
        self.sources = torch.tensor(sources)

    def map_sources(self, layer, n_rows):
        return self.sources


@pytest.mark.parametrize("context_dim", [None, 24])
def test_replaced_maps_run_on_the_fused_kernel_and_equal_the_explicit_path(context_dim):
    layer = _layer(context_dim)
    x = torch.randn(4, 30, 64)
    ctx = torch.randn(4, 7, context_dim) if context_dim else None
    with attached(layer, CopyRow([0, 1, 1, 1]), select=lambda l: True):
        fused = layer(x, ctx)  # SDPA(q_s, k_s, V_r): A_1 is never formed
        with attached(layer, Recorder(), select=lambda l: True) as _:
            explicit = layer(x, ctx)  # A_r ← A_1 on the materialised maps (what the hooks see)
    source = x if ctx is None else ctx
    q, k, v = (t.view(4, -1, 4, 16).transpose(1, 2) for t in (layer.to_q(x), layer.to_k(source), layer.to_v(source)))
    maps = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)[[0, 1, 1, 1]]  # A_r ← A_sources[r]
    expected = layer.to_out[0]((maps @ v).transpose(1, 2).reshape(4, 30, 64))
    assert (fused - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (explicit - expected).abs().max() < 1e-5 * expected.abs().max()
    assert not torch.allclose(fused[2], layer(x, ctx)[2], atol=1e-3)  # it did replace row 2's map
    with attached(layer, CopyRow([0, 0, 2, 3]), select=lambda l: True), \
            attached(layer, CopyRow([0, 1, 1, 3]), select=lambda l: True):
        composed = layer(x, ctx)  # row 2 takes row 1's map, which is row 0's
    with attached(layer, CopyRow([0, 0, 0, 3]), select=lambda l: True):
        assert torch.allclose(composed, layer(x, ctx), atol=1e-6)


@pytest.mark.parametrize("context_dim", [None, 24])
def test_upcast_attention_brings_bf16_closer_to_fp32_on_the_fused_path(context_dim):
    reference = _layer(context_dim)
    x = torch.randn(2, 64, 64) * 3
    ctx = torch.randn(2, 11, context_dim) * 3 if context_dim else None
    exact = reference(x, ctx)
    errors = {}
    for upcast in (False, True):
        low = _layer(context_dim).to(torch.bfloat16)
        low.upcast = upcast
        ctx_low = None if ctx is None else ctx.bfloat16()
        errors[upcast] = (low(x.bfloat16(), ctx_low).float() - exact).abs().mean().item()
        low.hooks.append(Recorder())  # the explicit path computes scores and softmax in fp32 either way
        slow = low(x.bfloat16(), ctx_low).float()
        errors[upcast, "explicit"] = (slow - exact).abs().mean().item()
    assert errors[True] < errors[False]  # closer, though bf16 projections dominate the layer's error
    assert errors[True, "explicit"] == errors[False, "explicit"]
    # the kernel alone, on the same bf16 q, k, v: upcast leaves only the output's rounding
    q, k, v = torch.randn(3, 2, 4, 64, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 4.0, dim=-1) @ v.float()
    kernel = {}
    for upcast in (False, True):
        low.upcast = upcast
        kernel[upcast] = (low.attend(q, k, v).float() - exact).abs().mean().item()
    assert kernel[True] < 0.85 * kernel[False]


def test_unet_layers_take_upcast_attention_from_the_config():
    with torch.device("meta"):
        sd1, sd2 = UNet(sd15().unet), UNet(sd21_v().unet)  # SD 2.1's config sets upcast_attention
    assert not any(layer.upcast for layer in attention_layers(sd1).values())
    assert all(layer.upcast for layer in attention_layers(sd2).values())


@pytest.mark.parametrize("context_dim", [None, 24])
def test_fused_projections_equal_the_separate_ones(context_dim):
    layer = _layer(context_dim)
    x = torch.randn(2, 30, 64)
    ctx = torch.randn(2, 7, context_dim) if context_dim else None
    with torch.no_grad():
        plain = layer(x, ctx)
        layer.fuse_projections()
        fused = layer(x, ctx)
        assert layer._fused[1].shape[0] == (2 if context_dim else 3) * 64  # one stacked matrix
        stacked = layer._fused[1].untyped_storage().data_ptr()
        projections = (layer.to_k, layer.to_v) if context_dim else (layer.to_q, layer.to_k, layer.to_v)
        assert all(p.weight.untyped_storage().data_ptr() == stacked for p in projections)  # held once
        # one GEMM with 3C (2C) columns instead of 3 (2) with C: the same sums, blocked differently
        assert (fused - plain).abs().max() < 1e-6 * plain.abs().max()
        layer.to_k.weight.mul_(2)  # an in-place update: the stacked weight is rebuilt from it
        changed = layer(x, ctx)
        layer.fuse_projections(False)
        assert (changed - layer(x, ctx)).abs().max() < 1e-6 * plain.abs().max()
        assert not torch.allclose(changed, fused, atol=1e-3)
    layer.fuse_projections()
    layer(x, ctx).sum().backward()  # while the projections are trained, the separate ones run
    assert layer.to_q.weight.grad is not None and layer.to_k.weight.grad.abs().sum() > 0
