"""Every renaming rule of weights_convert, one table each (docs/checkpoints.md §4-§8), plus the inference of the
architecture from shapes and the completeness of a whole conversion (every key used or ignored)."""

import pytest
import torch

from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, sd15, sd21_base, tiny_sd1, tiny_sd2
from ldm.model import StableDiffusion, WeightsError
from tests import peers
from weights_convert import architecture, assemble
from weights_convert.diffusers_folder import heads_from_diffusers, unet_config_from_diffusers
from weights_convert.ldm_checkpoint import convert_ldm_checkpoint
from weights_convert.ldm_text import convert_open_clip, open_clip_keys
from weights_convert.ldm_unet import ema_key, layers_per_level, unet_key
from weights_convert.ldm_vae import as_linear, diffusers_vae_key, vae_key

UNET_RULES = [  # SD 1.x/2.x layout, L = 2 (docs/checkpoints.md §5 tables)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.2.bias", "conv_out.bias"),
    ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
    ("input_blocks.2.0.in_layers.2.bias", "down_blocks.0.resnets.1.conv1.bias"),
    ("input_blocks.2.1.proj_in.weight", "down_blocks.0.attentions.1.proj_in.weight"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ("input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"),
    ("input_blocks.10.0.emb_layers.1.weight", "down_blocks.3.resnets.0.time_emb_proj.weight"),
    ("input_blocks.11.0.out_layers.3.weight", "down_blocks.3.resnets.1.conv2.weight"),
    ("middle_block.0.out_layers.0.bias", "mid_block.resnets.0.norm2.bias"),
    ("middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"),
    ("middle_block.2.in_layers.2.weight", "mid_block.resnets.1.conv1.weight"),
    ("output_blocks.0.0.skip_connection.bias", "up_blocks.0.resnets.0.conv_shortcut.bias"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),  # no attention: position 1
    ("output_blocks.3.1.norm.weight", "up_blocks.1.attentions.0.norm.weight"),
    ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),  # with attention: position 2
    ("output_blocks.8.1.proj_out.weight", "up_blocks.2.attentions.2.proj_out.weight"),
    ("output_blocks.11.0.out_layers.3.bias", "up_blocks.3.resnets.2.conv2.bias"),
    ("output_blocks.11.1.transformer_blocks.0.norm3.weight", "up_blocks.3.attentions.2.transformer_blocks.0.norm3.weight"),
]


@pytest.mark.parametrize("ldm, ours", UNET_RULES)
def test_unet_rule(ldm, ours):
    assert unet_key(ldm, 2) == ours


@pytest.mark.parametrize("ldm", ["input_blocks.1.0.in_layers.1.weight", "output_blocks.2.3.conv.weight", "label_emb.0.0.weight"])
def test_unet_keys_without_rule(ldm):
    assert unet_key(ldm, 2) is None


def test_layers_per_level_from_block_lists():
    assert layers_per_level(list(peers.ldm_unet_shapes(sd15().unet))) == 2
    three = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, False), layers_per_level=3, n_heads=2)
    assert layers_per_level(list(peers.ldm_unet_shapes(three))) == 3
    assert unet_key("input_blocks.4.0.op.weight", 3) == "down_blocks.0.downsamplers.0.conv.weight"
    assert unet_key("output_blocks.4.0.in_layers.0.weight", 3) == "up_blocks.1.resnets.0.norm1.weight"


def test_ema_name_is_derived_from_the_raw_key():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert ema_key("model.diffusion_model.middle_block.1.proj_in.bias") == "model_ema.diffusion_modelmiddle_block1proj_inbias"


VAE_RULES = [  # 4 levels (docs/checkpoints.md §6); the decoder's levels are reversed
    ("encoder.conv_in.weight", "encoder.conv_in.weight"),
    ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
    ("encoder.down.0.block.1.conv2.weight", "encoder.down_blocks.0.resnets.1.conv2.weight"),
    ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias"),
    ("encoder.mid.block_1.norm1.weight", "encoder.mid_block.resnets.0.norm1.weight"),
    ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
    ("encoder.mid.attn_1.q.weight", "encoder.mid_block.attentions.0.to_q.weight"),
    ("decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias"),
    ("decoder.mid.block_2.conv1.weight", "decoder.mid_block.resnets.1.conv1.weight"),
    ("decoder.up.3.block.0.norm1.weight", "decoder.up_blocks.0.resnets.0.norm1.weight"),
    ("decoder.up.0.block.2.conv2.bias", "decoder.up_blocks.3.resnets.2.conv2.bias"),
    ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
    ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
    ("quant_conv.weight", "quant_conv.weight"),
    ("post_quant_conv.bias", "post_quant_conv.bias"),
]


@pytest.mark.parametrize("ldm, ours", VAE_RULES)
def test_vae_rule(ldm, ours):
    assert vae_key(ldm, 4) == ours


def test_vae_attention_conv_becomes_linear_and_old_names_are_renamed():
    conv = torch.randn(8, 8, 1, 1)
    linear = as_linear("encoder.mid_block.attentions.0.to_k.weight", conv)
    assert linear.shape == (8, 8) and torch.equal(linear, conv[:, :, 0, 0])
    assert as_linear("encoder.conv_in.weight", torch.randn(8, 3, 3, 3)).shape == (8, 3, 3, 3)
    assert diffusers_vae_key("decoder.mid_block.attentions.0.proj_attn.weight") == "decoder.mid_block.attentions.0.to_out.0.weight"
    assert diffusers_vae_key("encoder.mid_block.attentions.0.query.bias") == "encoder.mid_block.attentions.0.to_q.bias"
    assert vae_key("encoder.mid.attn_1.x.weight", 4) is None


def test_open_clip_in_proj_split_order_and_projection_transpose():
    width = 6
    q, k, v = (torch.full((width, width), float(i)) + torch.randn(width, width) for i in range(3))
    split = dict(open_clip_keys("transformer.resblocks.3.attn.in_proj_weight", torch.cat([q, k, v])))
    prefix = "text_model.encoder.layers.3.self_attn."
    assert torch.equal(split[prefix + "q_proj.weight"], q) and torch.equal(split[prefix + "k_proj.weight"], k)
    assert torch.equal(split[prefix + "v_proj.weight"], v)
    bias = dict(open_clip_keys("transformer.resblocks.0.attn.in_proj_bias", torch.arange(3 * width).float()))
    assert bias["text_model.encoder.layers.0.self_attn.k_proj.bias"].tolist() == list(range(width, 2 * width))
    projection = torch.randn(width, 4)  # open_clip: x @ P
    (name, weight), = open_clip_keys("text_projection", projection)
    assert name == "text_projection.weight" and torch.equal(weight, projection.t())  # Linear: x @ Wᵀ
    assert open_clip_keys("transformer.resblocks.1.mlp.c_fc.bias", q)[0][0] == "text_model.encoder.layers.1.mlp.fc1.bias"
    assert open_clip_keys("positional_embedding", q)[0][0] == "text_model.embeddings.position_embedding.weight"
    assert open_clip_keys("transformer.resblocks.1.ls_1.gamma", q) is None


def test_open_clip_ignores_only_the_last_block_and_the_contrastive_head():
    tensors = {f"cond_stage_model.model.transformer.resblocks.{n}.ln_1.weight": torch.ones(4) for n in range(3)}
    tensors.update({"cond_stage_model.model.text_projection": torch.ones(4, 2), "cond_stage_model.model.logit_scale": torch.ones(())})
    mapping = convert_open_clip(tensors, n_layers=2, projection=False)
    assert sorted(mapping.ignored) == ["cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection",
                                       "cond_stage_model.model.transformer.resblocks.2.ln_1.weight"]
    assert sorted(mapping.tensors) == [f"text_model.encoder.layers.{n}.layer_norm1.weight" for n in range(2)]
    with_projection = convert_open_clip(tensors, n_layers=3, projection=True)
    assert "text_projection.weight" in with_projection.tensors and len(with_projection.tensors) == 4


def test_diffusers_head_counts():
    assert heads_from_diffusers([320, 640, 1280, 1280], 8) == dict(n_heads=8, head_dim=None)
    assert heads_from_diffusers([320, 640, 1280, 1280], [5, 10, 20, 20]) == dict(n_heads=None, head_dim=64)
    assert heads_from_diffusers([32, 64, 64], [2, 2, 2]) == dict(n_heads=2, head_dim=None)
    with pytest.raises(WeightsError, match="neither one head count nor one head size"):
        heads_from_diffusers([32, 64, 64], [1, 2, 3])
    assert unet_config_from_diffusers(peers.diffusers_unet_config(tiny_sd2().unet)) == tiny_sd2().unet
    assert unet_config_from_diffusers(peers.diffusers_unet_config(sd21_base().unet)) == sd21_base().unet


@pytest.mark.parametrize("field, value", [("class_embed_type", "timestep"), ("transformer_layers_per_block", 2),
                                          ("brand_new_option", True)])
def test_diffusers_config_refuses_other_architectures(field, value):
    cfg = {**peers.diffusers_unet_config(tiny_sd1().unet), field: value}
    with pytest.raises(WeightsError, match=field):
        unet_config_from_diffusers(cfg)


def _shape_only_checkpoint(cfg: ModelConfig) -> dict:
    """An LDM checkpoint of ``cfg`` without building any model (text encoder shapes written out here)."""
    state = peers.random_tensors(peers.ldm_unet_shapes(cfg.unet), 0, "model.diffusion_model.")
    state.update(peers.random_tensors(peers.ldm_vae_shapes(cfg.vae), 1, "first_stage_model."))
    t = cfg.text
    p = "cond_stage_model.model."
    shapes = {f"{p}token_embedding.weight": (t.vocab_size, t.width), f"{p}positional_embedding": (t.max_length, t.width),
              f"{p}ln_final.weight": (t.width,), f"{p}ln_final.bias": (t.width,), f"{p}text_projection": (t.width, 8)}
    for n in range(t.n_layers + 1):
        b = f"{p}transformer.resblocks.{n}."
        shapes.update({b + "attn.in_proj_weight": (3 * t.width, t.width), b + "attn.in_proj_bias": (3 * t.width,),
                       b + "attn.out_proj.weight": (t.width, t.width), b + "attn.out_proj.bias": (t.width,),
                       b + "ln_1.weight": (t.width,), b + "ln_1.bias": (t.width,), b + "ln_2.weight": (t.width,),
                       b + "ln_2.bias": (t.width,), b + "mlp.c_fc.weight": (t.mlp_dim, t.width),
                       b + "mlp.c_fc.bias": (t.mlp_dim,), b + "mlp.c_proj.weight": (t.width, t.mlp_dim),
                       b + "mlp.c_proj.bias": (t.width,)})
    state.update(peers.random_tensors(shapes, 2))
    return state


def test_architecture_is_read_from_shapes_with_the_family_rules():
    """A small SD 2-style model whose heads follow the family rule (head size 64, 16 text heads): the
    config inferred from the weights alone equals the one the weights were made from."""
    cfg = ModelConfig(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_levels=(False, True), layers_per_level=1,
                        n_heads=None, head_dim=64, context_dim=80, linear_projection=True, upcast_attention=True),
        vae=VAEConfig(block_channels=(32, 64), layers_per_level=1),
        text=TextEncoderConfig(vocab_size=99, max_length=12, width=64, n_layers=2, n_heads=16, mlp_dim=96,
                               activation="gelu", pad_token_id=0),
        prediction_type="v_prediction", family="sd2")
    mapping = convert_ldm_checkpoint(_shape_only_checkpoint(cfg), "sd2", use_ema=False)
    assert architecture.model_config(mapping.tensors, "sd2", "v_prediction") == cfg
    with pytest.raises(WeightsError, match="12 heads"):
        architecture.text_config({k[len("text_encoder."):]: v for k, v in mapping.tensors.items()
                                  if k.startswith("text_encoder.")}, "sd1")


@pytest.mark.parametrize("make_cfg", [tiny_sd1, tiny_sd2, lambda: tiny_sd1(8)], ids=["sd1", "sd2", "ip2p"])
def test_every_source_key_is_used_or_ignored_and_every_target_filled_once(make_cfg):
    cfg = make_cfg()
    source = peers.ldm_checkpoint(cfg, seed=0, ema=True)
    mapping = convert_ldm_checkpoint(source, cfg.family, use_ema=True)
    with torch.device("meta"):
        target = StableDiffusion(cfg)
    tensors, report = assemble(mapping, target)
    assert report.ok and report.filled == len(target.state_dict()) == len(tensors)
    assert set(report.ignored) | set(mapping.sources.values()) == set(source)  # nothing silently dropped
    used = [mapping.sources[k] for k in tensors]
    assert len(set(used)) == len(used) - (4 * cfg.text.n_layers if cfg.family == "sd2" else 0)  # in_proj: 2 keys -> 6
    # distinct random values per key: each target holds exactly the values of the source key it names
    for key, source_key in list(mapping.sources.items())[::7]:
        if "in_proj" not in source_key and "attentions.0.to_" not in key:
            assert torch.equal(tensors[key], source[source_key])
