"""Model configurations as small frozen dataclasses, with named presets.

Defaults are Stable Diffusion 1.5. Every field says what it means and where the value comes from
(CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml, Stability-AI/stablediffusion
configs/stable-diffusion/v2-inference[-v].yaml, and the diffusers config.json of the same models).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels; 8 for InstructPix2Pix (noisy latent ++ image latent)
    out_channels: int = 4
    model_channels: int = 320  # channels of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # which levels have spatial transformers
    layers_per_level: int = 2  # ResBlocks per encoder level (the decoder has one more)
    n_heads: int | None = 8  # SD 1.x gives a head count ...
    head_dim: int | None = None  # ... SD 2.x a head size (64); exactly one of the two is set
    context_dim: int = 768  # text hidden size: 768 (CLIP-L) or 1024 (OpenCLIP-H)
    linear_projection: bool = False  # SD 2.x: proj_in/proj_out are Linear, applied after flattening
    upcast_attention: bool = False  # SD 2.1: attention scores and softmax in fp32 even in fp16
    norm_groups: int = 32
    time_embed_dim_mult: int = 4  # time embedding width = 4 * model_channels (1280)
    # SDXL: transformer blocks per spatial transformer, one entry per level (the middle block uses the last
    # level's); None means one block everywhere (SD 1.x/2.x)
    transformer_depth: tuple[int, ...] | None = None
    # SDXL "text_time" added conditioning: None (SD 1.x/2.x) or "text_time" (a pooled text embedding and the
    # size/crop micro-conditioning numbers, each through a sinusoid of addition_time_embed_dim, then an MLP
    # from addition_in_dim = pooled width + n_numbers · addition_time_embed_dim, added to the time embedding)
    addition_embed: str | None = None
    addition_time_embed_dim: int = 256
    addition_in_dim: int = 0

    def __post_init__(self):
        assert (self.n_heads is None) != (self.head_dim is None), "give n_heads or head_dim, not both"
        assert len(self.attention_levels) == len(self.channel_mult), "one attention flag per level"
        assert self.transformer_depth is None or len(self.transformer_depth) == len(self.channel_mult), \
            "one transformer depth per level"
        assert self.addition_embed in (None, "text_time"), f"unknown addition_embed {self.addition_embed!r}"
        assert self.addition_embed is None or self.addition_in_dim > 0, "text_time needs addition_in_dim"
        assert len(self.channel_mult) >= 2, "at least two levels"
        assert self.channel_mult[0] == 1, "level 0 has multiplier 1 (conv_in's width), as in every SD model"
        for ch in self.level_channels:
            assert ch % self.norm_groups == 0, f"{ch} channels not divisible by {self.norm_groups} groups"
            self.heads_at(ch)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def depth_at(self, level: int) -> int:
        """Transformer blocks in each spatial transformer of ``level`` (-1: the middle block)."""
        return 1 if self.transformer_depth is None else self.transformer_depth[level]

    def heads_at(self, channels: int) -> int:
        """Number of attention heads for a transformer of this width."""
        if self.n_heads is not None:
            assert channels % self.n_heads == 0, f"{channels} channels not divisible by {self.n_heads} heads"
            return self.n_heads
        assert channels % self.head_dim == 0, f"{channels} channels not divisible by head size {self.head_dim}"
        return channels // self.head_dim


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # one per level; all but the last downsample
    layers_per_level: int = 2  # ResNets per encoder level (the decoder has one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # z = 0.18215 * E(x) (LDM scale_factor); SDXL 0.13025
    # decode in fp32 whatever the model dtype: SDXL's VAE overflows in fp16 (NaN / black images); only a VAE
    # fine-tuned to stay in fp16 range (madebyollin/sdxl-vae-fp16-fix, force_upcast false) may run in fp16
    force_upcast: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_length: int = 77  # 75 content tokens + start + end
    width: int = 768
    n_layers: int = 12  # layers actually run; SD 2.x runs 23 of OpenCLIP-H's 24 (the "penultimate" layer)
    n_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP-L) or "gelu" (OpenCLIP-H)
    pad_token_id: int = 49407  # SD 1.x pads with the end token, SD 2.x with 0 (open_clip)
    projection_dim: int | None = None  # text_projection width, only for towers that carry one

    def __post_init__(self):
        assert self.activation in ("quick_gelu", "gelu"), f"unknown activation {self.activation!r}"
        assert self.width % self.n_heads == 0


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: the three networks plus how the UNet output is read."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction" (SD 2.x 768-v); never guessed from weights
    family: str = "sd1"  # "sd1", "sd2", "ip2p", "sdxl", "sdxl-refiner" or "toy": used in messages and presets
    # SDXL base's second text encoder (OpenCLIP ViT-bigG with projection); the SDXL refiner has bigG alone,
    # as ``text``, and no text_2
    text_2: TextEncoderConfig | None = None

    def __post_init__(self):
        assert self.prediction_type in ("epsilon", "v_prediction"), self.prediction_type

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        tupled = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(
            unet=UNetConfig(**tupled(raw["unet"])),
            vae=VAEConfig(**tupled(raw["vae"])),
            text=TextEncoderConfig(**raw["text"]),
            text_2=TextEncoderConfig(**raw["text_2"]) if raw.get("text_2") else None,
            prediction_type=raw["prediction_type"],
            family=raw["family"],
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------- presets


def sd15() -> ModelConfig:
    """SD 1.x (1.4, 1.5): CLIP-L text (last layer), 768 context, 8 heads, conv projections, epsilon."""
    return ModelConfig()


def sd2_text() -> TextEncoderConfig:
    """OpenCLIP ViT-H/14 text tower, cut after layer 23 of 24 (SD 2.x's "penultimate" output)."""
    return TextEncoderConfig(width=1024, n_layers=23, n_heads=16, mlp_dim=4096, activation="gelu", pad_token_id=0)


def sd21_base() -> ModelConfig:
    """SD 2.x 512-base: OpenCLIP-H text, 1024 context, head size 64, linear projections, epsilon."""
    unet = UNetConfig(n_heads=None, head_dim=64, context_dim=1024, linear_projection=True, upcast_attention=True)
    return ModelConfig(unet=unet, text=sd2_text(), family="sd2")


def sd21_v() -> ModelConfig:
    """SD 2.x 768-v: as 512-base, v-prediction."""
    return sd21_base().replace(prediction_type="v_prediction")


def instruct_pix2pix() -> ModelConfig:
    """InstructPix2Pix: SD 1.5 with an 8-channel conv_in (noisy latent ++ unscaled image latent)."""
    return ModelConfig(unet=UNetConfig(in_channels=8), family="ip2p")


def tiny_text(width: int = 32, pad_token_id: int = 49407, activation: str = "quick_gelu") -> TextEncoderConfig:
    return TextEncoderConfig(width=width, n_layers=2, n_heads=4, mlp_dim=4 * width, activation=activation,
                             pad_token_id=pad_token_id)


def tiny_sd1(in_channels: int = 4) -> ModelConfig:
    """Test config that keeps every branch: 3 levels (2 with attention, the last without and without a
    downsampler), 2 ResBlocks per level, channel changes (conv_shortcut), heads given as a count, and a
    2-level VAE (asymmetric downsampling pad, reversed decoder levels)."""
    unet = UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2, 2),
                      attention_levels=(True, True, False), n_heads=2, context_dim=32)
    vae = VAEConfig(block_channels=(32, 64), norm_groups=32)
    return ModelConfig(unet=unet, vae=vae, text=tiny_text(), family="sd1" if in_channels == 4 else "ip2p")


def tiny_sd2() -> ModelConfig:
    """Tiny SD 2-style config: head size (16) instead of count, linear projections, cross-attention width
    (48) unlike any channel count, GELU text encoder padded with 0, v-prediction."""
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(False, True, True),
                      n_heads=None, head_dim=16, context_dim=48, linear_projection=True, upcast_attention=True)
    vae = VAEConfig(block_channels=(32, 64))
    return ModelConfig(unet=unet, vae=vae, text=tiny_text(48, pad_token_id=0, activation="gelu"),
                       prediction_type="v_prediction", family="sd2")


def sdxl_text_l() -> TextEncoderConfig:
    """SDXL's first text encoder: OpenAI CLIP ViT-L/14 (as SD 1.x), all 12 layers (SDXL reads layer 11)."""
    return TextEncoderConfig()


def sdxl_text_g() -> TextEncoderConfig:
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14, all 32 layers, GELU, padded with 0, and the
    1280-wide text_projection that gives the pooled embedding."""
    return TextEncoderConfig(width=1280, n_layers=32, n_heads=20, mlp_dim=5120, activation="gelu", pad_token_id=0,
                             projection_dim=1280)


def sdxl_base() -> ModelConfig:
    """SDXL 1.0 base (*SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis*, Podell
    et al. 2023): 3 levels of 320/640/1280 channels, no attention at the first, 2 and 10 transformer blocks at
    the others (10 in the middle), head size 64, linear projections, context = CLIP-L ++ bigG penultimate
    states (768 + 1280 = 2048), "text_time" conditioning of 1280 + 6·256 = 2816 numbers, VAE scale 0.13025."""
    unet = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_levels=(False, True, True),
                      n_heads=None, head_dim=64, context_dim=2048, linear_projection=True,
                      transformer_depth=(1, 2, 10), addition_embed="text_time", addition_time_embed_dim=256,
                      addition_in_dim=1280 + 6 * 256)
    return ModelConfig(unet=unet, vae=VAEConfig(scaling_factor=0.13025), text=sdxl_text_l(), text_2=sdxl_text_g(),
                       family="sdxl")


def sdxl_refiner_unet() -> UNetConfig:
    """The SDXL 1.0 refiner's UNet (its text encoder is bigG alone: context 1280; its micro-conditioning is
    five numbers, the crop and sizes plus an aesthetic score: 1280 + 5·256 = 2560)."""
    return UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(False, True, True, False),
                      n_heads=None, head_dim=64, context_dim=1280, linear_projection=True,
                      transformer_depth=(4, 4, 4, 4), addition_embed="text_time", addition_time_embed_dim=256,
                      addition_in_dim=1280 + 5 * 256)


def sdxl_refiner() -> ModelConfig:
    """SDXL 1.0 refiner: the refiner UNet, OpenCLIP-bigG as its only text encoder (context = bigG's
    penultimate states, 1280; pooled = its projection), micro-conditioning (h_orig, w_orig, c_top, c_left,
    aesthetic score), SDXL's VAE."""
    return ModelConfig(unet=sdxl_refiner_unet(), vae=VAEConfig(scaling_factor=0.13025), text=sdxl_text_g(),
                       family="sdxl-refiner")


def tiny_sdxl_refiner() -> ModelConfig:
    """Tiny refiner-shaped test config: 4 levels, attention only at the middle two (none at the first and
    last, as in the refiner), transformer depth 2 (the middle block takes the last level's: 2), head size 16,
    bigG-like text alone (gelu, width 48, padded with 0, projection 48), 48 + 5·8 added numbers."""
    text_g = TextEncoderConfig(width=48, n_layers=3, n_heads=4, mlp_dim=96, activation="gelu", pad_token_id=0,
                               projection_dim=48)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(False, True, True, False),
                      n_heads=None, head_dim=16, context_dim=text_g.width, linear_projection=True,
                      transformer_depth=(1, 2, 2, 2), addition_embed="text_time", addition_time_embed_dim=8,
                      addition_in_dim=text_g.projection_dim + 5 * 8)
    return ModelConfig(unet=unet, vae=VAEConfig(block_channels=(32, 64), scaling_factor=0.13025), text=text_g,
                       family="sdxl-refiner")


def tiny_sdxl() -> ModelConfig:
    """Tiny SDXL-shaped test config: 3 levels (no attention at the first, none of its downsamplers at the
    last), transformer depths 2 and 3 (3 in the middle), head size 16, linear projections, two text encoders
    (quick_gelu width 32 padded with the end token; gelu width 48 padded with 0, with a projection), context
    32 + 48 = 80, text_time conditioning of 48 + 6·8 numbers, SDXL's VAE scale."""
    text_l = TextEncoderConfig(width=32, n_layers=3, n_heads=4, mlp_dim=64)
    text_g = TextEncoderConfig(width=48, n_layers=3, n_heads=4, mlp_dim=96, activation="gelu", pad_token_id=0,
                               projection_dim=48)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(False, True, True),
                      n_heads=None, head_dim=16, context_dim=text_l.width + text_g.width, linear_projection=True,
                      transformer_depth=(1, 2, 3), addition_embed="text_time", addition_time_embed_dim=8,
                      addition_in_dim=text_g.projection_dim + 6 * 8)
    return ModelConfig(unet=unet, vae=VAEConfig(block_channels=(32, 64), scaling_factor=0.13025), text=text_l,
                       text_2=text_g, family="sdxl")


PRESETS = {
    "sd15": sd15,
    "sd21-base": sd21_base,
    "sd21-v": sd21_v,
    "instruct-pix2pix": instruct_pix2pix,
    "tiny-sd1": tiny_sd1,
    "tiny-sd2": tiny_sd2,
    "sdxl-base": sdxl_base,
    "sdxl": sdxl_base,  # short name of the same preset
    "tiny-sdxl": tiny_sdxl,
    "sdxl-refiner": sdxl_refiner,
    "tiny-sdxl-refiner": tiny_sdxl_refiner,
}


def toy() -> ModelConfig:
    """The bundled toy model (ldm/toy): 64×64 images, a 3-level VAE (factor 4: 16×16×4 latents), a small
    UNet with cross-attention at 8² and in the 4² middle block (none at 16²: it cost 40% of a CPU training
    step, better spent on more steps), a 2-layer CLIP text encoder over the
    full BPE vocabulary. Same classes as SD; the scaling factor is measured on the data after VAE training
    (the trained file's metadata holds the value actually used)."""
    # Sized for a 2-core CPU (ldm/toy/train.py): 3.1M UNet parameters, 0.7M VAE, 3.3M text (3.2M of them the
    # 49408×64 token table); one ResBlock per encoder level, 2 heads, GroupNorm over 16 (UNet) / 8 (VAE) groups.
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_levels=(False, True, False),
                      layers_per_level=1, n_heads=2, context_dim=64, norm_groups=16)
    vae = VAEConfig(block_channels=(16, 32, 64), layers_per_level=1, norm_groups=8, scaling_factor=1.0)
    return ModelConfig(unet=unet, vae=vae, text=tiny_text(64), family="toy")


PRESETS["toy"] = toy
