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
from editing.bench.ldm_layout import ldm_unet_shapes, ldm_vae_shapes  # noqa: F401  (re-exported for the tests)
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
