"""The CLIP text transformer (*Learning Transferable Visual Models From Natural Language Supervision*,
Radford et al.) as Stable Diffusion uses it.

    h_0 = E_token[ids] + E_pos
    h_l = h_{l−1} + MHA(LN1 h_{l−1}, causal);  h_l += MLP(LN2 h_l),  MLP = fc2(act(fc1 ·))
    out = LN_final(h_L)

Two variants (docs/checkpoints.md §7, §12):
- SD 1.x, OpenAI CLIP ViT-L/14: 12 layers, width 768, quick_gelu (x·σ(1.702x)), last layer.
- SD 2.x, OpenCLIP ViT-H/14: GELU, width 1024, the output of layer 23 of 24 ("penultimate") then LN_final.
  The config simply builds 23 layers, so ``out`` is that tensor (diffusers stores the same 23-layer tower).
Parameter names follow transformers' CLIPTextModel, so converted weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, N, d]: token i sees tokens ≤ i
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))  # [B, h, N, d] -> [B, N, C]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CausalSelfAttention(cfg.width, cfg.n_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.mlp.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.activation = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.activation(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """ids [B, 77] -> hidden states [B, 77, width] (the UNet's cross-attention context)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings [B, N, width] (textual inversion optimises rows of the first)."""
        emb = self.text_model.embeddings
        return emb.token_embedding(ids) + emb.position_embedding.weight[: ids.shape[1]]

    def forward(self, ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids) if inputs_embeds is None else inputs_embeds
        for layer in self.text_model.encoder.layers:
            h = layer(h)
        return self.text_model.final_layer_norm(h)

    def pooled(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: the hidden state at the end token (the highest id), projected if the
        tower has a projection. [B, N, width] -> [B, projection_dim or width]."""
        end = hidden[torch.arange(hidden.shape[0]), ids.argmax(dim=-1)]
        return end if self.text_projection is None else self.text_projection(end)
