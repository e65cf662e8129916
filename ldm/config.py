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

    def __post_init__(self):
        assert (self.n_heads is None) != (self.head_dim is None), "give n_heads or head_dim, not both"
        assert len(self.attention_levels) == len(self.channel_mult), "one attention flag per level"
        assert len(self.channel_mult) >= 2, "at least two levels"
        assert self.channel_mult[0] == 1, "level 0 has multiplier 1 (conv_in's width), as in every SD model"
        for ch in self.level_channels:
            assert ch % self.norm_groups == 0, f"{ch} channels not divisible by {self.norm_groups} groups"
            self.heads_at(ch)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

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
    scaling_factor: float = 0.18215  # z = 0.18215 * E(x) (LDM scale_factor)

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
    family: str = "sd1"  # "sd1", "sd2", "ip2p" or "toy": used in messages and presets

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


PRESETS = {
    "sd15": sd15,
    "sd21-base": sd21_base,
    "sd21-v": sd21_v,
    "instruct-pix2pix": instruct_pix2pix,
    "tiny-sd1": tiny_sd1,
    "tiny-sd2": tiny_sd2,
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
