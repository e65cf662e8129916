"""IP-Adapter (*IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models*, Ye et
al. 2023; docs/methods.md §8): an image prompt through decoupled cross-attention.

    c_ip   = LayerNorm(reshape(W e + b, T × C))                   image tokens (T = 4, C = 768 for SD 1.5)
    c_ip^∅ = LayerNorm(reshape(W 0 + b, T × C))                   the negative: projection of zeros, not zeros
    out    = softmax(Q K_tᵀ/√d) V_t + λ_l · softmax(Q K_ipᵀ/√d) V_ip       (§3.2; λ_l at inference)
    K_ip   = c_ip W_k_ip,  V_ip = c_ip W_v_ip                                        new, bias-free

The text branch is the UNet's own cross-attention, untouched; the image branch is an attention hook
(ldm/attention.py ``extra_output``) that adds λ_l·softmax(Q K_ipᵀ/√d)V_ip before to_out, with the same Q.
Layers whose scale λ_l is 0 get no hook at all (no computation), so scale 0 everywhere is the plain model.
The text context stays 77 tokens: image tokens never pass through the text projections (docs/methods.md §9.3 item 2).

Parameter names are the official file's (``image_proj.proj``, ``image_proj.norm``, ``ip_adapter.{k}.to_k_ip``):
k is the attention processor's position in diffusers' registration order (down, up, mid; odd k = attn2),
``processor_table`` builds it from the UNet (docs/checkpoints.md §9.1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ldm.attention import Attention, attached, attention_layers
from ldm.hooks import AttentionHook, join_guidance
from ldm.pipeline import SamplingConfig, guided, text_to_image


IMAGE_ENCODERS = {  # image_embeds width -> the CLIP image encoder the published adapters of that width use
    1024: "OpenCLIP ViT-H/14, h94/IP-Adapter models/image_encoder (ip-adapter_sd15, ip-adapter_sdxl_vit-h)",
    1280: "OpenCLIP ViT-bigG/14, h94/IP-Adapter sdxl_models/image_encoder (ip-adapter_sdxl)",
}


def check_image_encoder(adapter: "IPAdapter", embed_dim: int, adapter_name: str, encoder_name: str) -> None:
    """A one-line ValueError when the image encoder's embedding width is not the one the adapter projects."""
    expected = adapter.image_proj.proj.in_features
    if embed_dim != expected:
        kind = lambda width: IMAGE_ENCODERS.get(width, "not a published IP-Adapter encoder")
        raise ValueError(f"{adapter_name} takes {expected}-wide image embeddings ({kind(expected)}), but the image "
                         f"encoder {encoder_name} gives {embed_dim}-wide ones ({kind(embed_dim)}); pass the "
                         "adapter's own image encoder as --image-encoder")


def diffusers_block(layer_name: str) -> str:
    """editlab layer name -> diffusers attention block: "down.2.1.cross" (or, in a block of SDXL's deep
    transformers, "down.2.1.7.cross") -> "down_blocks.2.attentions.1"."""
    part, level, block = layer_name.split(".")[:3]
    if part == "mid":
        return f"mid_block.attentions.{block}"
    return f"{part}_blocks.{level}.attentions.{block}"


def processor_table(unet: nn.Module) -> dict[int, Attention]:
    """k -> cross-attention layer, k = 2j + 1 over the layers in diffusers' module registration order
    (down_blocks, up_blocks, mid_block -- not the call order); even k are the self-attention processors."""
    cross = [layer for layer in attention_layers(unet).values() if layer.kind == "cross"]
    order = {"down": 0, "up": 1, "mid": 2}
    registered = sorted(cross, key=lambda layer: order[layer.name.split(".")[0]])  # stable: keeps block order
    return {2 * j + 1: layer for j, layer in enumerate(registered)}


class ImageProjection(nn.Module):
    """image_embeds [B, D] -> image tokens [B, T, C]: LayerNorm(reshape(Linear_{D→T·C}(e)))."""

    def __init__(self, embed_dim: int, token_dim: int, n_tokens: int = 4):
        super().__init__()
        self.n_tokens = n_tokens
        self.proj = nn.Linear(embed_dim, n_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).view(image_embeds.shape[0], self.n_tokens, -1)  # [B, T·C] -> [B, T, C]
        return self.norm(tokens)


class ImageBranch(nn.Module):
    """The new key and value projections of one cross-attention layer (bias-free, C -> layer width)."""

    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(token_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(token_dim, hidden, bias=False)


class IPAdapter(nn.Module):
    """The adapter's parameters for one UNet: the image projection and one ImageBranch per cross-attention."""

    def __init__(self, unet: nn.Module, embed_dim: int = 1024, token_dim: int | None = None, n_tokens: int = 4):
        super().__init__()
        table = processor_table(unet)
        if not table:
            raise ValueError("this UNet has no cross-attention layers, so an IP-Adapter has nowhere to attach")
        token_dim = token_dim or next(iter(table.values())).to_k.in_features  # the UNet's context width
        self.image_proj = ImageProjection(embed_dim, token_dim, n_tokens)
        self.ip_adapter = nn.ModuleDict(
            {str(k): ImageBranch(token_dim, layer.n_heads * layer.head_dim) for k, layer in table.items()})
        self.index = {layer.name: str(k) for k, layer in table.items()}  # editlab layer name -> k

    def tokens(self, image_embeds: torch.Tensor, guidance: float) -> torch.Tensor:
        """Image tokens for a sampling batch: [c_ip^∅; c_ip] ([2B, T, C]) under guidance, else c_ip."""
        image_embeds = image_embeds.to(self.image_proj.proj.weight.dtype)
        positive = self.image_proj(image_embeds)
        if not guided(guidance):
            return positive
        return join_guidance(self.image_proj(torch.zeros_like(image_embeds)), positive)  # c_ip^∅ = proj(0)

    def layer_scales(self, scale: float | Mapping[str, float]) -> dict[str, float]:
        """One scale for every adapted layer, or a {layer name: scale} dict (unnamed layers: 0)."""
        if not isinstance(scale, Mapping):
            return {name: float(scale) for name in self.index}
        unknown = [name for name in scale if name not in self.index]
        if unknown:
            raise ValueError(f"no adapted cross-attention layer named {unknown}; the adapter has {list(self.index)}")
        return {name: float(s) for name, s in scale.items()}


class ImagePromptHook(AttentionHook):
    """Attention hook adding λ_l·softmax(Q K_ipᵀ/√d)V_ip to the selected cross-attention layers."""

    def __init__(self, adapter: IPAdapter, tokens: torch.Tensor, scales: Mapping[str, float]):
        self.adapter, self.tokens, self.scales = adapter, tokens, dict(scales)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # K_ip, V_ip are the same every step

    def keys_values(self, layer: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.name in self._cache:
            return self._cache[layer.name]
        branch = self.adapter.ip_adapter[self.adapter.index[layer.name]]
        b, t, _ = self.tokens.shape
        k, v = (proj(self.tokens).view(b, t, layer.n_heads, layer.head_dim).transpose(1, 2)
                for proj in (branch.to_k_ip, branch.to_v_ip))  # [B, T, h*d] -> [B, h, T, d]
        if not torch.is_grad_enabled():  # cache only when nothing is being optimised through them
            self._cache[layer.name] = (k, v)
        return k, v

    def extra_output(self, layer: Attention, q: torch.Tensor, attend) -> torch.Tensor | None:
        scale = self.scales.get(layer.name, 0.0)
        if scale == 0.0:
            return None
        k, v = self.keys_values(layer)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"{k.shape[0]} image-token rows for a batch of {q.shape[0]} in {layer.name}; "
                             "give one image embedding per prompt (or one for all)")
        return scale * attend(q, k.to(q.dtype), v.to(q.dtype))  # λ_l · softmax(Q K_ipᵀ/√d) V_ip


def image_prompt_hook(adapter: IPAdapter, image_embeds: torch.Tensor, batch: int, guidance: float,
                      scale: float | Mapping[str, float]) -> ImagePromptHook:
    """The hook for a sampling batch of ``batch`` prompts (image_embeds [1 or batch, D])."""
    if image_embeds.ndim != 2 or image_embeds.shape[0] not in (1, batch):
        raise ValueError(f"image embeddings of shape {list(image_embeds.shape)}; expected [1, D] or [{batch}, D]")
    if image_embeds.shape[1] != adapter.image_proj.proj.in_features:
        raise ValueError(f"image embeddings of width {image_embeds.shape[1]}, but the adapter expects "
                         f"{adapter.image_proj.proj.in_features} (use the image encoder it was trained with)")
    embeds = image_embeds.expand(batch, -1)
    active = {name: s for name, s in adapter.layer_scales(scale).items() if s != 0.0}  # λ = 0: no hook at all
    return ImagePromptHook(adapter, adapter.tokens(embeds, guidance), active)


@torch.no_grad()
def generate_with_image_prompt(model, adapter: IPAdapter, image_embeds: torch.Tensor, prompts: Sequence[str],
                               scale: float | Mapping[str, float] = 1.0, cfg: SamplingConfig = SamplingConfig(),
                               negative: str | Sequence[str] | None = None, hooks: Sequence = (),
                               progress: bool = True) -> torch.Tensor:
    """Text-to-image with an image prompt; returns the final latents (``decode_latents`` makes images).
    ``scale``: λ for every adapted layer, or {layer name: λ} (InstantStyle's block selection)."""
    hook = image_prompt_hook(adapter, image_embeds.to(model.device), len(prompts), cfg.guidance, scale)
    with attached(model.unet, hook, list(hook.scales)):
        return text_to_image(model, prompts, cfg, negative=negative, hooks=hooks, progress=progress)
