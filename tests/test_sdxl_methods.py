"""Editing methods on a tiny SDXL model (converted from a random diffusers SDXL folder) against diffusers.

InstantStyle with an SDXL-shaped IP-Adapter: the paper's presets select exactly the transformer blocks of
``up_blocks.0.attentions.1`` (style) and ``down_blocks.2.attentions.1`` (layout), read from the layers that
actually received image tokens; the generations equal ``StableDiffusionXLPipeline`` after
``load_ip_adapter`` + ``set_ip_adapter_scale`` with the same per-block dictionaries (latents to 1e-4
relative: the same sums in a different batch layout).
"""

import pytest
import torch
from safetensors.torch import save_file

from controls import ip_adapter as ip
from editing.instant_style import content_embedding, instant_style, block_scales, preset_scales, subtract_content
from editing.bench.peers import diffusers_scheduler
from ldm.attention import attention_layers
from ldm.config import tiny_sdxl
from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig
from ldm.sdxl import MicroConditioning
from tests.peers import relative_error
from tests.peers_sdxl import make_sdxl_folder
from weights_convert import convert
from weights_convert.ip_adapter import load_ip_adapter, processor_table

EMBED = 32  # width of the (stand-in) image encoder's embedding


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-methods")
    pipe = make_sdxl_folder(tiny_sdxl(), folder / "diffusers", seed=9)
    convert(folder / "diffusers", folder / "model.safetensors")
    return StableDiffusion.load(folder / "model.safetensors"), pipe, folder


def _adapter_file(model, path, seed=0):
    """A random IP-Adapter in the official layout for this UNet (4 tokens of the 80-wide context)."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = 4, model.config.unet.context_dim
    state = {"image_proj": {"proj.weight": torch.randn(tokens * width, EMBED, generator=g) / EMBED ** 0.5,
                            "proj.bias": 0.1 * torch.randn(tokens * width, generator=g),
                            "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
                            "norm.bias": 0.1 * torch.randn(width, generator=g)},
             "ip_adapter": {}}
    for k, layer in processor_table(model.unet).items():
        hidden = layer.n_heads * layer.head_dim
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{k}.{name}.weight"] = torch.randn(hidden, width, generator=g) / width ** 0.5
    save_file({f"{group}.{key}": v for group, d in state.items() for key, v in d.items()}, str(path))
    return state


def test_processor_numbering_follows_diffusers(sdxl):
    model, pipe, _ = sdxl
    ours = [ip.diffusers_block(layer.name) for k, layer in sorted(processor_table(model.unet).items())]
    theirs = [name.rsplit(".transformer_blocks", 1)[0] for name in pipe.unet.attn_processors if name.endswith("attn2.processor")]
    assert ours == theirs and len(ours) == 28  # down 2·2 + 2·3, up 3·3 + 3·2, mid 3: down, up, mid order


@pytest.mark.parametrize("preset, diffusers_scale, blocks", [
    ("style", {"up": {"block_0": [0.0, 1.0, 0.0]}}, ["up.0.1"]),
    ("style+layout", {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}, ["up.0.1", "down.2.1"]),
])
@torch.no_grad()
def test_instant_style_presets_match_diffusers(sdxl, monkeypatch, preset, diffusers_scale, blocks):
    model, pipe, folder = sdxl
    state = _adapter_file(model, folder / "ip.safetensors")
    adapter, report = load_ip_adapter(folder / "ip.safetensors", model.unet)
    assert report.ok
    scales = preset_scales(model.unet, preset)
    in_diffusers_form = {name: s for name, s in block_scales(model.unet, diffusers_scale).items() if s}
    assert scales == in_diffusers_form  # the same selection in diffusers' dict form

    received = set()
    original = ip.ImagePromptHook.extra_output

    def recording(self, layer, q, attend):
        out = original(self, layer, q, attend)
        if out is not None:
            received.add(layer.name)
        return out

    monkeypatch.setattr(ip.ImagePromptHook, "extra_output", recording)
    embeds = torch.randn(1, EMBED, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(steps=4, guidance=5.0, scheduler="ddim", seed=4, height=32, width=48)
    ours = instant_style(model, adapter, embeds, ["a cat"], scales, cfg=cfg, negative="blurry", progress=False)
    depth = {"up.0.1": 3, "down.2.1": 3}  # transformer blocks per attention at level 2 (tiny config)
    expected = {f"{b}.{k}.cross" for b in blocks for k in range(depth[b])}
    assert received == expected and expected <= set(attention_layers(model.unet))

    pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
    try:
        pipe.set_ip_adapter_scale(diffusers_scale)
        pipe.scheduler = diffusers_scheduler("ddim", "epsilon")
        ref = pipe(prompt="a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=32,
                   width=48, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]],
                   generator=torch.Generator().manual_seed(4), output_type="latent").images
    finally:
        pipe.unload_ip_adapter()
    assert relative_error(ref, ours) <= 1e-4
    plain = instant_style(model, adapter, embeds, ["a cat"], {}, cfg=cfg, negative="blurry", progress=False)
    assert relative_error(ours, plain) > 1e-3  # the image tokens changed the result


def test_content_subtraction_uses_the_pooled_bigG_embedding(sdxl):
    model, pipe, _ = sdxl
    content = content_embedding(model.text_encoder_2, model.tokenizer_2, "a cat")
    _, _, pooled, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert content.shape == (1, 48) and relative_error(pooled, content) <= 1e-5
    style = torch.randn(1, 48)
    assert torch.allclose(subtract_content(style, content, 0.5), style - 0.5 * pooled, atol=1e-6)


@pytest.mark.parametrize("guess_mode", [False, True])
@torch.no_grad()
def test_controlnet_matches_stable_diffusion_xl_controlnet_pipeline(sdxl, guess_mode):
    """An SDXL ControlNet (its own text_time embedding) saved by diffusers and converted by editlab."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from controls.controlnet import ControlNet
    from controls.guidance import Control, controlnet_to_image
    from tests.peers import randomize_
    from weights_convert.controlnet import to_diffusers_config

    model, pipe, folder = sdxl
    made = randomize_(ControlNet.from_unet(model.unet, (16, 32)), 6).eval()
    peer = ControlNetModel(**to_diffusers_config(made.control_config))
    peer.load_state_dict(made.state_dict(), strict=True)
    peer.save_pretrained(folder / "controlnet")
    convert(folder / "controlnet", folder / "controlnet.safetensors")
    net = ControlNet.load(folder / "controlnet.safetensors")
    assert net.control_config == made.control_config and net.control_config.unet.addition_embed == "text_time"

    hint = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(8))
    cfg = SamplingConfig(steps=4, guidance=5.0, scheduler="ddim", seed=2, height=32, width=48)
    micro = MicroConditioning(original_size=(64, 96), crop_top_left=(4, 0), target_size=(32, 48))
    ours = controlnet_to_image(model, [Control(net, hint, 0.7)], ["a cat"], cfg, negative="blurry",
                               guess_mode=guess_mode, progress=False, micro=micro)
    xl = StableDiffusionXLControlNetPipeline(**{k: v for k, v in pipe.components.items()
                                                if k not in ("image_encoder", "feature_extractor")},
                                             controlnet=peer.eval(), add_watermarker=False)
    xl.set_progress_bar_config(disable=True)
    xl.scheduler = diffusers_scheduler("ddim", "epsilon")
    ref = xl("a cat", image=hint, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=32,
             width=48, controlnet_conditioning_scale=0.7, guess_mode=guess_mode, original_size=(64, 96),
             crops_coords_top_left=(4, 0), target_size=(32, 48), generator=torch.Generator().manual_seed(2),
             output_type="latent").images
    assert relative_error(ref, ours) <= 1e-4


@torch.no_grad()
def test_instruct_pix2pix_matches_stable_diffusion_xl_instruct_pix2pix_pipeline(sdxl):
    """An 8-channel SDXL editing UNet in a diffusers folder, converted; three-row guidance, zero ∅_T."""
    import dataclasses

    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    from editing.instruct_pix2pix.editor import EditConfig, edit_by_instruction as edit
    from tests.peers import make_diffusers_unet

    model, pipe, folder = sdxl
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor", "unet")}
    unet = make_diffusers_unet(dataclasses.replace(model.config.unet, in_channels=8), seed=12)
    ip2p = StableDiffusionXLInstructPix2PixPipeline(**components, unet=unet, add_watermarker=False)
    ip2p.save_pretrained(folder / "ip2p")
    convert(folder / "ip2p", folder / "ip2p.safetensors")
    edit_model = StableDiffusion.load(folder / "ip2p.safetensors")
    assert edit_model.config.unet.in_channels == 8 and edit_model.is_sdxl

    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    cfg = EditConfig(text_guidance=5.0, image_guidance=1.5, steps=4, scheduler="ddim", seed=3)
    ours = edit(edit_model, image, ["make it red"], cfg, progress=False)
    ip2p.set_progress_bar_config(disable=True)
    ip2p.scheduler = diffusers_scheduler("ddim", "epsilon")
    ref = ip2p("make it red", image=image, height=32, width=48, num_inference_steps=4, guidance_scale=5.0,
               image_guidance_scale=1.5, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert relative_error(ref, ours) <= 1e-4


@torch.no_grad()
def test_textual_inversion_sdxl_format_matches_diffusers(sdxl, tmp_path):
    """{"clip_l": [k, 32], "clip_g": [k, 48]} into both encoders, as diffusers' documented two
    load_textual_inversion calls; the conditioning (context and pooled) of a prompt using the token agrees."""
    import copy

    from inversion.textual_inversion import load_textual_inversion

    model, pipe, folder = sdxl
    model = StableDiffusion.load(folder / "model.safetensors")  # a fresh copy: loading grows its token tables
    g = torch.Generator().manual_seed(5)
    rows = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    save_file(rows, str(tmp_path / "emb.safetensors"))
    token = load_textual_inversion(model, tmp_path / "emb.safetensors", token="<thing>")

    te, te2 = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.text_encoder_2)
    tok, tok2 = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.tokenizer_2)
    other = type(pipe)(**{**pipe.components, "text_encoder": te, "text_encoder_2": te2, "tokenizer": tok,
                          "tokenizer_2": tok2})
    other.load_textual_inversion(rows["clip_l"], token=token, text_encoder=te, tokenizer=tok)
    other.load_textual_inversion(rows["clip_g"], token=token, text_encoder=te2, tokenizer=tok2)
    prompt = [f"a photo of {token} on a mat"]
    ref_context, _, ref_pooled, _ = other.encode_prompt(prompt, do_classifier_free_guidance=False)
    from ldm.sdxl import encode_prompt
    context, pooled = encode_prompt(model, prompt)
    assert relative_error(ref_context, context) <= 1e-5 and relative_error(ref_pooled, pooled) <= 1e-5
    plain, _ = encode_prompt(model, ["a photo of thing on a mat"])
    assert relative_error(context, plain) > 1e-3


@torch.no_grad()
def test_prompt_to_prompt_on_sdxl(sdxl):
    """One token alignment serves both encoders (their 77 positions coincide); the controller sees every
    attention layer of SDXL's deep transformers, keeps the source row, edits the others."""
    from editing.p2p.edit import P2PConfig, prompt_to_prompt
    from ldm.pipeline import text_to_image

    model, _, _ = sdxl
    cfg = SamplingConfig(steps=4, guidance=5.0, scheduler="ddim", seed=7, height=32, width=48)
    source, target = "a cat sitting on a mat", "a dog sitting on a mat"
    same = prompt_to_prompt(model, source, source, cfg, P2PConfig(blend_words=("cat",)))
    assert torch.equal(same.latents[1], same.latents[0])
    # the stored maps average many layers' rows, whose reductions may round per row: equal to float precision
    assert relative_error(same.maps[0], same.maps[1]) <= 1e-6
    assert same.maps.shape[0] == 2 and same.maps.shape[-1] == 77
    assert same.controller.calls_per_step == [len(attention_layers(model.unet))] * cfg.steps
    edit = prompt_to_prompt(model, source, target, cfg, P2PConfig(self_replace=(0.0, 0.5)))
    alone = text_to_image(model, [source], cfg, progress=False)  # no negative: zero conditioning, as P2P's
    assert relative_error(alone[0], edit.latents[0]) <= 1e-4  # batch 2 vs 1: sums in another order
    untouched = prompt_to_prompt(model, source, target, cfg, P2PConfig(cross_replace=0.0, self_replace=(0.0, 0.0),
                                                                       store=False))
    assert relative_error(untouched.latents[1], edit.latents[1]) > 1e-3
