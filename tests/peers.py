"""Reference implementations ("peers") built from an editlab config, for parity tests.

- configs (re-exported from editing/bench/peers.py, which the benchmarks share): ``diffusers_unet_config``,
  ``diffusers_vae_config``, ``transformers_text_config``, ``scheduler_config``;
- models with distinct random weights: ``make_diffusers_unet``, ``make_diffusers_vae``, ``make_clip_text_model``,
  ``make_open_clip_text`` (+ ``open_clip_hidden_states``: SD 2's penultimate layer + ln_final);
- tokenizer: ``make_hf_tokenizer`` (transformers' CLIPTokenizer from open_clip's BPE; editing/bench/peers.py);
- folders and files: ``make_diffusers_folder`` (a complete pipeline folder written by diffusers'
  save_pretrained), ``write_diffusers_configs`` (configs only, for diffusers' single-file loader) and
  ``ldm_checkpoint`` (a state dict in the original CompVis / Stability key layout, written from the original
  module structure, not from editlab's conversion rules);
- ``relative_error(a, b)``: max|a − b| / max|a|.

The heavy libraries are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from editing.bench.peers import (diffusers_unet_config, diffusers_vae_config, make_hf_tokenizer, scheduler_config,
                                 transformers_text_config)
from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max|a − b| / max|a|: the error relative to the output's scale."""
    return ((reference - other).abs().max() / reference.abs().max()).item()


# ------------------------------------------------------------------------------------------------ configs


# diffusers_unet_config, diffusers_vae_config, transformers_text_config, scheduler_config: editing/bench/peers.py


# ------------------------------------------------------------------------------------------------ weights


def random_like_shape(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Distinct random values that keep activations O(1): norms' scales around 1, biases around 0, other
    weights N(0, 1/fan_in)."""
    if len(shape) <= 1:
        base = 1.0 if name.endswith("weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter, in place, with values distributed as ``random_like_shape``'s."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim <= 1:
            param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=generator)
        else:
            param.normal_(0.0, 1 / math.sqrt(param[0].numel()), generator=generator)
    return module


def _on_meta_then_random(build, seed: int) -> nn.Module:
    """Build without running the library's (slow) init, then fill with random values. Only for modules
    without buffers, which ``to_empty`` would leave uninitialised."""
    with torch.device("meta"):
        module = build()
    assert not list(module.buffers()), "to_empty would leave buffers uninitialised"
    return randomize_(module.to_empty(device="cpu"), seed).eval()


def make_diffusers_unet(cfg: UNetConfig, seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    return _on_meta_then_random(lambda: UNet2DConditionModel(**diffusers_unet_config(cfg, sample_size)), seed)


def make_diffusers_vae(cfg: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKL

    return _on_meta_then_random(lambda: AutoencoderKL(**diffusers_vae_config(cfg)), seed)


def make_clip_text_model(cfg: TextEncoderConfig, seed: int = 0):
    """transformers CLIPTextModel (random weights) with ``cfg``'s architecture."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize_(CLIPTextModel(CLIPTextConfig(**transformers_text_config(cfg))), seed).eval()


def make_open_clip_text(cfg: TextEncoderConfig, seed: int = 0, projection_dim: int = 16):
    """open_clip's text tower with ``cfg.n_layers + 1`` blocks: SD 2 runs all but the last (penultimate)."""
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=cfg.max_length, vocab_size=cfg.vocab_size, width=cfg.width,
                            heads=cfg.n_heads, layers=cfg.n_layers + 1, mlp_ratio=cfg.mlp_dim / cfg.width,
                            output_dim=projection_dim, act_layer=nn.GELU)
    return randomize_(tower, seed).eval()


@torch.no_grad()
def open_clip_hidden_states(tower, ids: torch.Tensor) -> torch.Tensor:
    """SD 2's text conditioning, computed with open_clip's own modules (Stability-AI/stablediffusion
    FrozenOpenCLIPEmbedder, layer="penultimate"): every block but the last, then ln_final."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


# ------------------------------------------------------------------------------------------------ tokenizer


# write_tokenizer, make_hf_tokenizer: editing/bench/peers.py


# ------------------------------------------------------------------------------------------------ folders


def make_diffusers_folder(cfg: ModelConfig, path: str | Path, seed: int = 0):
    """Write a complete diffusers pipeline folder for ``cfg`` with random weights (save_pretrained: unet,
    vae, text_encoder, tokenizer, PNDM scheduler with SD's values, model_index.json) and return the pipeline,
    whose ``.unet``, ``.vae``, ``.text_encoder``, ``.tokenizer`` are the reference components."""
    from diffusers import PNDMScheduler, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    pipeline_class = StableDiffusionInstructPix2PixPipeline if cfg.unet.in_channels == 8 else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=make_diffusers_vae(cfg.vae, seed + 1), text_encoder=make_clip_text_model(cfg.text, seed + 2),
        tokenizer=make_hf_tokenizer(Path(path) / "_bpe", cfg.text.pad_token_id),
        unet=make_diffusers_unet(cfg.unet, seed), scheduler=PNDMScheduler.from_config(scheduler_config(cfg.prediction_type)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return pipeline


def write_diffusers_configs(cfg: ModelConfig, path: str | Path) -> Path:
    """Only the config files of a diffusers folder (what ``from_single_file(config=path)`` reads)."""
    path = Path(path)
    files = {"unet/config.json": {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(cfg.unet)},
             "vae/config.json": {"_class_name": "AutoencoderKL", **diffusers_vae_config(cfg.vae)},
             "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                          **transformers_text_config(cfg.text)},
             "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", **scheduler_config(cfg.prediction_type)},
             "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                  "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}}
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content))
    return path


# ------------------------------------------------------------------------------------------------ LDM layout
# Shapes written from the original modules: CompVis ldm/modules/diffusionmodules/openaimodel.py (UNetModel,
# ResBlock), ldm/modules/attention.py (SpatialTransformer), ldm/modules/diffusionmodules/model.py (VAE).


def _ldm_resblock(p: str, cin: int, cout: int, emb: int) -> dict:
    shapes = {f"{p}in_layers.0.weight": (cin,), f"{p}in_layers.0.bias": (cin,),
              f"{p}in_layers.2.weight": (cout, cin, 3, 3), f"{p}in_layers.2.bias": (cout,),
              f"{p}emb_layers.1.weight": (cout, emb), f"{p}emb_layers.1.bias": (cout,),
              f"{p}out_layers.0.weight": (cout,), f"{p}out_layers.0.bias": (cout,),
              f"{p}out_layers.3.weight": (cout, cout, 3, 3), f"{p}out_layers.3.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{p}skip_connection.weight": (cout, cin, 1, 1), f"{p}skip_connection.bias": (cout,)})
    return shapes


def _ldm_spatial_transformer(p: str, c: int, ctx: int, linear: bool, depth: int = 1) -> dict:
    proj = (c, c) if linear else (c, c, 1, 1)
    shapes = {f"{p}norm.weight": (c,), f"{p}norm.bias": (c,), f"{p}proj_in.weight": proj, f"{p}proj_in.bias": (c,),
              f"{p}proj_out.weight": proj, f"{p}proj_out.bias": (c,)}
    for k in range(depth):  # SDXL (sgm) stacks `depth` BasicTransformerBlocks
        b = f"{p}transformer_blocks.{k}."
        shapes.update({f"{b}ff.net.0.proj.weight": (8 * c, c), f"{b}ff.net.0.proj.bias": (8 * c,),
                       f"{b}ff.net.2.weight": (c, 4 * c), f"{b}ff.net.2.bias": (c,)})
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            shapes.update({f"{b}{attn}.to_q.weight": (c, c), f"{b}{attn}.to_k.weight": (c, kv),
                           f"{b}{attn}.to_v.weight": (c, kv), f"{b}{attn}.to_out.0.weight": (c, c),
                           f"{b}{attn}.to_out.0.bias": (c,)})
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update({f"{b}{norm}.weight": (c,), f"{b}{norm}.bias": (c,)})
    return shapes


def ldm_unet_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of LDM's UNetModel for ``cfg`` (keys without ``model.diffusion_model.``)."""
    mc, L, last = cfg.model_channels, cfg.layers_per_level, len(cfg.channel_mult) - 1
    emb = mc * cfg.time_embed_dim_mult
    st = lambda p, c, level: _ldm_spatial_transformer(p, c, cfg.context_dim, cfg.linear_projection, cfg.depth_at(level))
    shapes = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
              "time_embed.2.bias": (emb,), "input_blocks.0.0.weight": (mc, cfg.in_channels, 3, 3),
              "input_blocks.0.0.bias": (mc,)}
    if cfg.addition_embed == "text_time":  # sgm: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        shapes.update({"label_emb.0.0.weight": (emb, cfg.addition_in_dim), "label_emb.0.0.bias": (emb,),
                       "label_emb.0.2.weight": (emb, emb), "label_emb.0.2.bias": (emb,)})
    n, ch, skips = 1, mc, [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(L):
            shapes.update(_ldm_resblock(f"input_blocks.{n}.0.", ch, mult * mc, emb))
            ch = mult * mc
            if cfg.attention_levels[level]:
                shapes.update(st(f"input_blocks.{n}.1.", ch, level))
            skips.append(ch)
            n += 1
        if level != last:
            shapes.update({f"input_blocks.{n}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{n}.0.op.bias": (ch,)})
            skips.append(ch)
            n += 1
    shapes.update(_ldm_resblock("middle_block.0.", ch, ch, emb))
    shapes.update(st("middle_block.1.", ch, -1))
    shapes.update(_ldm_resblock("middle_block.2.", ch, ch, emb))
    n = 0
    for level in reversed(range(len(cfg.channel_mult))):
        attention = cfg.attention_levels[level]
        for i in range(L + 1):
            shapes.update(_ldm_resblock(f"output_blocks.{n}.0.", ch + skips.pop(), cfg.channel_mult[level] * mc, emb))
            ch = cfg.channel_mult[level] * mc
            if attention:
                shapes.update(st(f"output_blocks.{n}.1.", ch, level))
            if level and i == L:
                up = f"output_blocks.{n}.{2 if attention else 1}.conv."
                shapes.update({up + "weight": (ch, ch, 3, 3), up + "bias": (ch,)})
            n += 1
    shapes.update({"out.0.weight": (mc,), "out.0.bias": (mc,), "out.2.weight": (cfg.out_channels, mc, 3, 3),
                   "out.2.bias": (cfg.out_channels,)})
    return shapes


def _ldm_vae_resnet(p: str, cin: int, cout: int) -> dict:
    shapes = {f"{p}norm1.weight": (cin,), f"{p}norm1.bias": (cin,), f"{p}conv1.weight": (cout, cin, 3, 3),
              f"{p}conv1.bias": (cout,), f"{p}norm2.weight": (cout,), f"{p}norm2.bias": (cout,),
              f"{p}conv2.weight": (cout, cout, 3, 3), f"{p}conv2.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{p}nin_shortcut.weight": (cout, cin, 1, 1), f"{p}nin_shortcut.bias": (cout,)})
    return shapes


def _ldm_vae_mid(p: str, c: int) -> dict:
    shapes = {**_ldm_vae_resnet(f"{p}block_1.", c, c), **_ldm_vae_resnet(f"{p}block_2.", c, c),
              f"{p}attn_1.norm.weight": (c,), f"{p}attn_1.norm.bias": (c,)}
    for conv in ("q", "k", "v", "proj_out"):  # 1×1 convs in LDM
        shapes.update({f"{p}attn_1.{conv}.weight": (c, c, 1, 1), f"{p}attn_1.{conv}.bias": (c,)})
    return shapes


def ldm_vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of LDM's AutoencoderKL for ``cfg`` (keys without ``first_stage_model.``)."""
    chs, z, L = cfg.block_channels, cfg.latent_channels, cfg.layers_per_level
    shapes = {"encoder.conv_in.weight": (chs[0], cfg.in_channels, 3, 3), "encoder.conv_in.bias": (chs[0],)}
    cin = chs[0]
    for i, c in enumerate(chs):
        for j in range(L):
            shapes.update(_ldm_vae_resnet(f"encoder.down.{i}.block.{j}.", cin, c))
            cin = c
        if i != len(chs) - 1:
            shapes.update({f"encoder.down.{i}.downsample.conv.weight": (c, c, 3, 3), f"encoder.down.{i}.downsample.conv.bias": (c,)})
    shapes.update(_ldm_vae_mid("encoder.mid.", chs[-1]))
    shapes.update({"encoder.norm_out.weight": (chs[-1],), "encoder.norm_out.bias": (chs[-1],),
                   "encoder.conv_out.weight": (2 * z, chs[-1], 3, 3), "encoder.conv_out.bias": (2 * z,),
                   "decoder.conv_in.weight": (chs[-1], z, 3, 3), "decoder.conv_in.bias": (chs[-1],)})
    shapes.update(_ldm_vae_mid("decoder.mid.", chs[-1]))
    cin = chs[-1]
    for i in reversed(range(len(chs))):  # LDM builds the decoder deepest first but stores it as up[i]
        for j in range(L + 1):
            shapes.update(_ldm_vae_resnet(f"decoder.up.{i}.block.{j}.", cin, chs[i]))
            cin = chs[i]
        if i != 0:
            shapes.update({f"decoder.up.{i}.upsample.conv.weight": (cin, cin, 3, 3), f"decoder.up.{i}.upsample.conv.bias": (cin,)})
    shapes.update({"decoder.norm_out.weight": (chs[0],), "decoder.norm_out.bias": (chs[0],),
                   "decoder.conv_out.weight": (cfg.in_channels, chs[0], 3, 3), "decoder.conv_out.bias": (cfg.in_channels,),
                   "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
                   "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {prefix + k: random_like_shape(k, s, generator) for k, s in shapes.items()}


def ldm_checkpoint(cfg: ModelConfig, seed: int = 0, ema: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the original single-file layout: UNet, VAE, text encoder (CLIP-L for quick_gelu
    configs, an OpenCLIP tower with one extra block, text_projection, logit_scale and attn_mask for gelu
    ones), the training schedule buffers, and with ``ema`` a ``model_ema.*`` copy (different values)."""
    unet = random_tensors(ldm_unet_shapes(cfg.unet), seed, "model.diffusion_model.")
    state = {**unet, **random_tensors(ldm_vae_shapes(cfg.vae), seed + 1, "first_stage_model.")}
    if ema:
        ema_values = random_tensors({k: tuple(v.shape) for k, v in unet.items()}, seed + 3)
        state.update({"model_ema." + k.split(".", 1)[1].replace(".", ""): v for k, v in ema_values.items()})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    if cfg.text.activation == "gelu":
        tower = make_open_clip_text(cfg.text, seed + 2)
        state.update({"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()})
        state["cond_stage_model.model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
        state["cond_stage_model.model.attn_mask"] = tower.attn_mask.clone()
    else:
        text = make_clip_text_model(cfg.text, seed + 2)
        state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in text.state_dict().items()})
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(cfg.text.max_length)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    state.update({name: betas.float() for name in SCHEDULE_BUFFERS})
    return state
