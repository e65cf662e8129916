"""The same model in diffusers / transformers, for side-by-side benchmarks and agreement checks.

editlab's module names are diffusers' (UNet, VAE) and transformers' (CLIP text), so an editlab state dict
loads into the peer strictly; only the configs need translating. diffusers and transformers are test and
benchmark dependencies (``pip install -e .[test]``), imported here lazily.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.model import StableDiffusion


def require_peers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("benchmarks compare against diffusers and transformers: pip install -e '.[test]'") from None


def diffusers_unet_config(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """editlab UNetConfig -> UNet2DConditionModel kwargs (diffusers' attention_head_dim is a head count)."""
    heads = [cfg.heads_at(ch) for ch in cfg.level_channels]
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=cfg.level_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]),
        layers_per_block=cfg.layers_per_level, cross_attention_dim=cfg.context_dim,
        attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
        use_linear_projection=cfg.linear_projection, upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True, freq_shift=0, sample_size=sample_size,
        **_sdxl_unet_fields(cfg))


def _sdxl_unet_fields(cfg: UNetConfig) -> dict:
    """SDXL's per-level transformer depth and "text_time" conditioning in diffusers' names."""
    fields = {}
    if cfg.transformer_depth is not None:
        fields["transformer_layers_per_block"] = list(cfg.transformer_depth)
    if cfg.addition_embed is not None:
        fields.update(addition_embed_type=cfg.addition_embed, addition_time_embed_dim=cfg.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=cfg.addition_in_dim)
    return fields


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    n = len(cfg.block_channels)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_level,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scaling_factor, sample_size=64)


def transformers_text_config(cfg: TextEncoderConfig) -> dict:
    """editlab TextEncoderConfig -> transformers CLIPTextConfig fields."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                max_position_embeddings=cfg.max_length, hidden_act=cfg.activation, layer_norm_eps=1e-5,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=cfg.pad_token_id,
                **({"projection_dim": cfg.projection_dim} if cfg.projection_dim else {}))


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion's scheduler_config.json values (docs/checkpoints.md §8)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
                prediction_type=prediction_type, timestep_spacing="leading")


@functools.lru_cache(maxsize=1)
def _bpe_files() -> tuple[str, str]:
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return json.dumps(vocab), "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n"


def write_tokenizer(folder: str | Path) -> Path:
    """vocab.json and merges.txt of open_clip's BPE (the 49408-entry CLIP vocabulary), with the start and
    end tokens under transformers' names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_files()
    (folder / "vocab.json").write_text(vocab)
    (folder / "merges.txt").write_text(merges)
    return folder


def make_hf_tokenizer(folder: str | Path, pad_token_id: int = 49407):
    """transformers CLIPTokenizer on open_clip's vocabulary; pads with EOS (SD 1) or "!" = id 0 (SD 2)."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer(folder)
    pad = {49407: "<|endoftext|>", 0: "!"}[pad_token_id]
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def diffusers_scheduler(name: str, prediction_type: str, euler_spacing: str = "linspace"):
    """A diffusers scheduler with SD's training schedule, set explicitly (docs/methods.md §0.1)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

    config = scheduler_config(prediction_type)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "ddpm":
        return DDPMScheduler.from_config({**config, "variance_type": "fixed_small"})
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config({**config, "timestep_spacing": euler_spacing})
    raise ValueError(f"no diffusers peer for scheduler {name!r}")


DIFFUSERS_SCHEDULERS = {  # editlab sampler -> (diffusers class, the config keys that make it that sampler)
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small"}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def diffusers_scheduler_from_config(name: str, config: dict, **overrides):
    """diffusers' ``X.from_config(config, **overrides)`` for editlab's sampler ``name`` (its A1111 names too):
    what a diffusers user gets by swapping the scheduler of a pipeline."""
    import diffusers
    from ldm.schedulers import resolve_sampler

    name, karras = resolve_sampler(name)
    cls, keys = DIFFUSERS_SCHEDULERS[name]
    if karras:
        overrides.setdefault("use_karras_sigmas", True)
    return getattr(diffusers, cls).from_config(config, **keys, **overrides)


def diffusers_components(model: StableDiffusion):
    """(unet, vae, text_encoder, tokenizer) in diffusers/transformers, holding the same weights as ``model``."""
    require_peers()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg: ModelConfig = model.config
    unet = UNet2DConditionModel(**diffusers_unet_config(cfg.unet))
    unet.load_state_dict(model.unet.state_dict(), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(cfg.vae))
    vae.load_state_dict(model.vae.state_dict(), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**transformers_text_config(cfg.text)))
    state = model.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 drops the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = text.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    device = model.device
    return (unet.to(device, model.unet.conv_in.weight.dtype).eval(), vae.to(device).eval(),
            text.to(device, model.text_encoder.text_model.final_layer_norm.weight.dtype).eval(),
            _tokenizer(cfg.text.pad_token_id))


def _tokenizer(pad_token_id: int):
    with tempfile.TemporaryDirectory() as tmp:
        return make_hf_tokenizer(tmp, pad_token_id)


def diffusers_pipeline(model: StableDiffusion, scheduler: str = "ddim", img2img: bool = False):
    """diffusers' pipeline holding ``model``'s weights, its scheduler built as a diffusers user would:
    ``X.from_config`` of the model's scheduler config (the one editlab samples with)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    unet, vae, text, tokenizer = diffusers_components(model)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
               scheduler=diffusers_scheduler_from_config(scheduler, model.scheduler_config),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
