"""Prompt-to-Prompt controllers: the edit functions, LocalBlend's union, the layer call count, which layers go
to the explicit attention path, and query chunking."""

from types import SimpleNamespace

import pytest
import torch

from editing.p2p.controllers import P2PController, Refine, Replace, Reweight
from editing.p2p.edit import P2PConfig, prompt_to_prompt
from editing.p2p.local_blend import LocalBlend
from ldm.attention import attached, attention_layers
from ldm.config import sd15, tiny_sd1
from ldm.hooks import AttentionHook
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig
from ldm.unet import UNet

CFG = SamplingConfig(steps=4, guidance=7.5, height=32, width=32, seed=3)  # 16² latents: levels 16², 8², 4²


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(tiny_sd1()).eval()


def random_probs(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


def test_edit_functions():
    source, edited = random_probs(2, 5, 77), random_probs(2, 2, 5, 77, seed=1)  # [heads, q, K], [B−1, ...]
    identity = Replace(torch.eye(77).expand(2, 77, 77))
    assert torch.equal(identity(source, edited), source.expand(2, -1, -1, -1))  # exact, not approximate
    swap = torch.eye(77)[:, torch.tensor([0, 3, 2, 1] + list(range(4, 77)))]  # tokens 1 and 3 exchanged
    assert torch.equal(Replace(swap[None])(source, edited[:1])[0][..., [1, 3]], source[..., [3, 1]])
    refine = Refine(torch.arange(77).expand(2, 77), torch.ones(2, 77))
    assert torch.equal(refine(source, edited), source.expand(2, -1, -1, -1))
    aligned = torch.ones(2, 77)
    aligned[:, 4] = 0  # token 4 is new: it keeps its own map
    out = Refine(torch.arange(77).expand(2, 77), aligned)(source, edited)
    assert torch.equal(out[..., 4], edited[..., 4]) and torch.equal(out[..., 5], source[..., 5].expand(2, 2, 5))
    assert torch.equal(Reweight(torch.ones(2, 77), refine)(source, edited), refine(source, edited))  # × 1: no-op
    scale = torch.ones(2, 77)
    scale[0, 2], scale[1, 2] = 2.0, -1.0  # negative weights allowed, no renormalisation
    out = Reweight(scale, identity)(source, edited)
    assert torch.equal(out[0, ..., 2], 2 * source[..., 2]) and torch.equal(out[1, ..., 2], -source[..., 2])
    assert torch.equal(Reweight(scale)(source, edited)[0, ..., 3], source[..., 3])  # alone: on A_0


def test_controller_edits_only_the_conditional_edited_rows():
    swap = torch.eye(77)[:, torch.tensor([0, 2, 1] + list(range(3, 77)))]  # tokens 1 and 2 exchanged
    controller = P2PController(3, Replace(swap.expand(2, 77, 77)), torch.ones(4, 2, 77), range(0, 2), 1)
    probs = random_probs(6, 2, 5, 77)  # [uncond × 3; cond × 3] rows, 2 heads, 5 queries
    cross, shallow_self = SimpleNamespace(kind="cross", level=0), SimpleNamespace(kind="self", level=0)
    deep_self = SimpleNamespace(kind="self", level=1)
    controller.begin_step(0, 0)
    out = controller.edit_probabilities(cross, probs, slice(0, 5))
    assert torch.equal(out[:4], probs[:4])  # unconditional rows and the source row pass unchanged
    assert torch.equal(out[4:, ..., 1], probs[3, ..., 2].expand(2, 2, 5))  # edited rows: A_0 through M
    assert not controller.wants_probabilities(deep_self)  # self-attention stays on the fused kernel
    assert controller.map_sources(shallow_self, 6) is None and controller.map_sources(cross, 6) is None  # level 0 < 1
    assert controller.map_sources(deep_self, 6).tolist() == [0, 1, 2, 3, 3, 3]  # A_j ← A_0 in the cond rows
    assert controller.map_sources(deep_self, 3).tolist() == [0, 0, 0]  # unguided: the conditional rows alone
    with pytest.raises(ValueError, match="batch of 5 rows for 3 prompts"):
        controller.map_sources(deep_self, 5)
    controller.begin_step(2, 0)  # past the self range
    assert controller.map_sources(deep_self, 6) is None
    assert torch.equal(controller.edit_probabilities(deep_self, probs, slice(0, 5)), probs)


def test_local_blend_union_is_a_logical_or():
    maps = torch.zeros(2, 8, 8, 77)
    maps[0, 1:5, 1:5, 2] = 1.0  # source word (token 2): top-left square
    maps[1, 3:7, 3:7, 2] = 1.0  # target word: overlapping square further down-right
    blend = LocalBlend(torch.tensor([[0.0, 0, 1] + [0] * 74] * 2), level=0, threshold=0.3)
    masks = blend.masks(maps, (8, 8))
    overlap = masks[0, 0] & masks[1, 0]
    assert overlap.sum() > 0 and (masks[0, 0] & ~masks[1, 0]).sum() > 0  # both parts exist
    latents = torch.randn(2, 4, 8, 8)
    out = blend(0, latents, maps)
    union = masks[0, 0] | masks[1, 0]
    assert torch.equal(out[0], latents[0])  # the source row is never blended
    # inside the union, overlap included: x_0 + 1·(x_j − x_0) = x_j (up to one rounding); outside: x_0 exactly
    assert torch.allclose(out[1][:, union], latents[1][:, union], atol=1e-6, rtol=0)
    assert torch.equal(out[1][:, ~union], latents[0][:, ~union])
    extrapolated = latents[0] + 2 * (latents[1] - latents[0])  # what adding float masks gives in the overlap
    gap = (latents[1] - latents[0])[:, overlap].abs()
    assert torch.allclose((extrapolated - out[1])[:, overlap].abs(), gap, atol=1e-6)  # we are |x_j − x_0| away
    late = LocalBlend(blend.token_masks, level=0, start_step=2)
    assert torch.equal(late(1, latents, maps), latents) and not torch.equal(late(2, latents, maps), latents)


def test_controller_sees_all_32_layers_of_sd15_once_per_forward():
    with torch.device("meta"):
        unet = UNet(sd15().unet)
        x, context = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 768)
    controller = P2PController(2)
    with attached(unet, controller) as layers, torch.no_grad():
        assert controller.attachment.layers == tuple(layers) and len(layers) == 32
        before = [layer.calls for layer in layers]
        for step in range(2):
            controller.begin_step(step, 0)
            unet(x, 10, context)
            controller.end_step(step, 0, x)  # raises unless each of the 32 layers ran once
        assert [layer.calls - b for layer, b in zip(layers, before)] == [2] * 32
        assert controller.calls_per_step == [32, 32]
        controller.begin_step(2, 0)
        with pytest.raises(RuntimeError, match="saw 0 attention layers in step 2, expected 32"):
            controller.end_step(2, 0, x)  # a step in which the hook reached no layer
        controller.begin_step(3, 0)
        unet(x, 10, context)
        unet(x, 10, context)
        with pytest.raises(RuntimeError, match="saw 64 attention layers in step 3, expected 32"):
            controller.end_step(3, 0, x)  # the UNet ran twice in one step
    assert controller.attachment is None and all(layer.hooks == [] for layer in layers)


class ExplicitProbe(AttentionHook):
    """Records which layers actually ran the explicit path (edit_probabilities is only called there), with
    the size of every query chunk, and the conditional rows it was shown (after the controller's edit)."""

    def __init__(self, keep_cross=False):
        self.layers, self.chunk_rows, self.keep_cross, self.cross = [], [], keep_cross, []

    def edit_probabilities(self, layer, probs, rows):
        if rows.start == 0:
            self.layers.append(layer.name)
        self.chunk_rows.append(rows.stop - rows.start)
        if self.keep_cross and layer.kind == "cross":
            self.cross.append((layer.name, rows, probs[-2:].clone()))
        return probs


def test_only_the_layers_a_controller_needs_go_explicit(model):
    names = attention_layers(model.unet)
    probe = ExplicitProbe()
    config = P2PConfig(cross_replace=0.5, self_replace=(0.0, 0.25), store=False)
    result = prompt_to_prompt(model, "a cat on a mat", "a dog on a mat", CFG, config, attention_hooks=[probe])
    explicit, replaced = result.controller.explicit_per_step, result.controller.replaced_per_step
    assert len(explicit) == len(replaced) == 4 and result.controller.calls_per_step == [len(names)] * 4 == [22] * 4
    cross = [n for n, layer in names.items() if layer.kind == "cross"]
    deep_self = [n for n, layer in names.items() if layer.kind == "self" and layer.level >= 1]
    assert sorted(explicit[0]) == sorted(explicit[1]) == sorted(cross)  # cross edits: per token, explicit
    assert explicit[2] == explicit[3] == []  # cross range over (2 calls): every layer on SDPA
    assert sorted(replaced[0]) == sorted(deep_self)  # step 0: self at ≤ 8² (level ≥ 1), on the fused kernel
    assert replaced[1] == replaced[2] == replaced[3] == []  # self range over (⌊0.25·4⌋ = 1 call)
    assert probe.layers == [n for step in explicit for n in step]  # the module agrees with the controller
    stored = P2PConfig(cross_replace=0.0, self_replace=(0.0, 0.0))  # store only (default map level 1)
    result = prompt_to_prompt(model, "a cat on a mat", "a dog on a mat", CFG, stored)
    assert all(sorted(step) == sorted(n for n in cross if names[n].level == 1)
               for step in result.controller.explicit_per_step)


def test_query_chunks_never_hold_a_whole_map_and_change_nothing(model):
    config = P2PConfig(cross_replace=1.0, self_replace=(0.0, 1.0), self_min_level=0, blend_words=("cat", "dog"))
    whole = prompt_to_prompt(model, "a cat on a mat", "a dog on a mat", CFG, config)
    layers = attention_layers(model.unet).values()
    probe = ExplicitProbe()
    try:
        for layer in layers:
            layer.query_chunk = 64  # level 0 has 16² = 256 queries: 4 chunks
        chunked = prompt_to_prompt(model, "a cat on a mat", "a dog on a mat", CFG, config, attention_hooks=[probe])
    finally:
        for layer in layers:
            layer.query_chunk = 1024
    assert max(probe.chunk_rows) == 64 and len(probe.chunk_rows) > len(probe.layers)
    assert (chunked.latents - whole.latents).abs().max() <= 1e-5 * whole.latents.abs().max()
    assert torch.allclose(chunked.maps, whole.maps, atol=1e-6)


@pytest.mark.parametrize("target, offset", [("a dog on a mat", 0), ("a hippopotamus on a mat", 2)])
def test_full_cross_replacement_leaves_other_tokens_with_the_source_maps(model, target, offset):
    probe = ExplicitProbe(keep_cross=True)
    config = P2PConfig(cross_replace=1.0, self_replace=(0.0, 0.0), store=False)
    prompt_to_prompt(model, "a cat on a mat", target, CFG, config, attention_hooks=[probe])
    assert len(probe.cross) == 4 * 11  # every cross layer of every step, seen after the edit
    for name, rows, cond in probe.cross:
        source, edited = cond[0], cond[1]  # [heads, q, K]
        assert torch.equal(edited[..., :2], source[..., :2]), name  # BOS, "a"
        assert torch.equal(edited[..., 3 + offset:], source[..., 3:77 - offset]), name  # "on a mat", EOS, pads
        swapped = edited[..., 2:3 + offset]
        assert torch.allclose(swapped, source[..., 2:3].expand_as(swapped) / (1 + offset), atol=1e-7), name
