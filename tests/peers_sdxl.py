"""SDXL peers for parity tests: a diffusers ``StableDiffusionXLPipeline`` folder with random weights, and an
original (Stability-AI generative-models, "sgm") single file: UNet under ``model.diffusion_model.`` with
``label_emb``, VAE under ``first_stage_model.``, CLIP-L in transformers' layout under
``conditioner.embedders.0.transformer.``, and OpenCLIP-bigG in open_clip's layout (fused ``in_proj``,
``text_projection`` as a bare [width, proj] matrix, ``logit_scale``) under ``conditioner.embedders.1.model.``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from editing.bench.peers import make_hf_tokenizer, scheduler_config, transformers_text_config
from ldm.config import ModelConfig, TextEncoderConfig
from tests.peers import (ldm_unet_shapes, ldm_vae_shapes, make_clip_text_model, make_diffusers_unet,
                         make_diffusers_vae, make_open_clip_text, random_tensors, randomize_)


def make_clip_text_with_projection(cfg: TextEncoderConfig, seed: int = 0):
    """transformers CLIPTextModelWithProjection (SDXL's text_encoder_2) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**transformers_text_config(cfg))), seed).eval()


def make_sdxl_pipeline(cfg: ModelConfig, bpe_folder: str | Path, seed: int = 0, scheduler=None):
    """StableDiffusionXLPipeline with random components for ``cfg`` (DDIM with SD's schedule unless given)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=make_diffusers_vae(cfg.vae, seed + 1), text_encoder=make_clip_text_model(cfg.text, seed + 2),
        text_encoder_2=make_clip_text_with_projection(cfg.text_2, seed + 3),
        tokenizer=make_hf_tokenizer(Path(bpe_folder) / "l", cfg.text.pad_token_id),
        tokenizer_2=make_hf_tokenizer(Path(bpe_folder) / "g", cfg.text_2.pad_token_id),
        unet=make_diffusers_unet(cfg.unet, seed), add_watermarker=False, force_zeros_for_empty_prompt=True,
        scheduler=scheduler or DDIMScheduler.from_config(scheduler_config("epsilon")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_folder(cfg: ModelConfig, path: str | Path, seed: int = 0):
    """A complete diffusers SDXL folder (save_pretrained) for ``cfg``; returns the pipeline."""
    pipe = make_sdxl_pipeline(cfg, Path(path) / "_bpe", seed)
    pipe.save_pretrained(path)
    return pipe


def sgm_checkpoint(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SDXL base state dict in the original single-file layout, distinct random values per key."""
    state = random_tensors(ldm_unet_shapes(cfg.unet), seed, "model.diffusion_model.")
    state.update(random_tensors(ldm_vae_shapes(cfg.vae), seed + 1, "first_stage_model."))
    clip_l = make_clip_text_model(cfg.text, seed + 2)
    prefix = "conditioner.embedders.0.transformer.text_model."
    state.update({prefix + k.removeprefix("text_model."): v for k, v in clip_l.state_dict().items()})
    state[prefix + "embeddings.position_ids"] = torch.arange(cfg.text.max_length)[None]
    # make_open_clip_text builds one block more than asked (SD 2's unused last block): ask one fewer
    tower = make_open_clip_text(dataclasses.replace(cfg.text_2, n_layers=cfg.text_2.n_layers - 1), seed + 3,
                                projection_dim=cfg.text_2.projection_dim)
    state.update({"conditioner.embedders.1.model." + k: v for k, v in tower.state_dict().items()})
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def open_clip_penultimate_and_pooled(tower, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sgm FrozenOpenCLIPEmbedder2 (layer="penultimate", legacy=False) with open_clip's own modules: the
    input of the last block (no ln_final), and ln_final(last block)[end token] @ text_projection."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    final = tower.ln_final(tower.transformer.resblocks[-1](x, attn_mask=tower.attn_mask))
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ tower.text_projection
    return x, pooled


def make_refiner_pipeline(cfg: ModelConfig, bpe_folder: str | Path, seed: int = 0):
    """StableDiffusionXLImg2ImgPipeline shaped like the SDXL refiner: bigG alone (``text_encoder=None``),
    ``requires_aesthetics_score=True``, ``force_zeros_for_empty_prompt=False`` (its model_index.json)."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=make_diffusers_vae(cfg.vae, seed + 1), text_encoder=None, tokenizer=None,
        text_encoder_2=make_clip_text_with_projection(cfg.text, seed + 3),
        tokenizer_2=make_hf_tokenizer(Path(bpe_folder) / "g", cfg.text.pad_token_id),
        unet=make_diffusers_unet(cfg.unet, seed), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False, scheduler=DDIMScheduler.from_config(scheduler_config("epsilon")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sgm_refiner_checkpoint(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SDXL refiner state dict in the original single-file layout: bigG (open_clip layout) at
    ``conditioner.embedders.0.model.``, no CLIP-L."""
    state = random_tensors(ldm_unet_shapes(cfg.unet), seed, "model.diffusion_model.")
    state.update(random_tensors(ldm_vae_shapes(cfg.vae), seed + 1, "first_stage_model."))
    tower = make_open_clip_text(dataclasses.replace(cfg.text, n_layers=cfg.text.n_layers - 1), seed + 3,
                                projection_dim=cfg.text.projection_dim)
    state.update({"conditioner.embedders.0.model." + k: v for k, v in tower.state_dict().items()})
    state["conditioner.embedders.0.model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def ip_adapter_state(unet, embed_dim: int, seed: int = 0, token_dim: int | None = None) -> dict[str, dict]:
    """A random IP-Adapter for ``unet`` in the official nested layout ({"image_proj": ..., "ip_adapter": ...}):
    4 tokens of the UNet's context width (or ``token_dim``) from ``embed_dim``-wide image embeddings."""
    from weights_convert.ip_adapter import processor_table

    g = torch.Generator().manual_seed(seed)
    tokens, width = 4, token_dim or unet.config.context_dim
    state = {"image_proj": {"proj.weight": torch.randn(tokens * width, embed_dim, generator=g) / embed_dim ** 0.5,
                            "proj.bias": 0.1 * torch.randn(tokens * width, generator=g),
                            "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
                            "norm.bias": 0.1 * torch.randn(width, generator=g)},
             "ip_adapter": {}}
    for k, layer in processor_table(unet).items():
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{k}.{name}.weight"] = torch.randn(layer.n_heads * layer.head_dim, width,
                                                                    generator=g) / width ** 0.5
    return state


def save_ip_adapter(state: dict[str, dict], path: str | Path) -> None:
    """The .safetensors form: the two groups flattened under ``image_proj.`` / ``ip_adapter.``."""
    from safetensors.torch import save_file

    save_file({f"{group}.{key}": v for group, d in state.items() for key, v in d.items()}, str(path))


def save_image_encoder(path: str | Path, width: int, heads: int, projection_dim: int, seed: int = 0):
    """A tiny random transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors), the
    layout of h94/IP-Adapter's ``models/image_encoder`` (ViT-H) and ``sdxl_models/image_encoder`` (ViT-bigG)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tests.peers import randomize_

    config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=heads, image_size=28, patch_size=14, projection_dim=projection_dim,
                              hidden_act="gelu")
    encoder = randomize_(CLIPVisionModelWithProjection(config), seed).eval()
    encoder.save_pretrained(str(path))
    return encoder
