"""PEZ: find a hard (discrete, readable) text prompt whose CLIP text feature matches target images.

Paper: *Hard Prompts Made Easy: Gradient-Based Discrete Optimization for Prompt Tuning and Discovery* (Wen,
Jain, Kirchenbauer, Goldblum, Geiping, Goldstein, NeurIPS 2023); code: YuxinWenRick/hard-prompts-made-easy
optim_utils.py. Visii (docs/methods.md §10.1 step 2) runs it on the AFTER image to initialise its instruction.

Notation: E [V, W] the CLIP token-embedding table, P [L, W] continuous prompt embeddings (L = length),
f_img [N, D] the target image features, CLIP_txt(·) the text tower on injected token embeddings.

    P_0 = E[random token ids]                                   initialisation (from ``generator``)
    ids = argmax_v cos(P_i, E_v)            for each i          projection Proj_E(P) (cosine on normalised rows)
    P'  = E[ids]
    s   = mean_n cos(CLIP_txt([BOS, P', EOS, pad…]), f_img_n)    similarity of the projected (hard) prompt
    L   = 1 − s                                                 loss
    P  ← AdamW(P, ∂L/∂P')                                       straight-through: the gradient taken at P'
                                                                is applied to the continuous P

The best projected prompt (highest s, checked every step as the reference does) is decoded to text. Decoding
and re-tokenizing BPE does not always round-trip (merges across token borders, invalid byte sequences), so
the reported ``similarity`` is that of the decoded text tokenized again, which is what a user of the text
gets; ``search_similarity`` is s of the projected ids.

Differences from the reference: the start/end tokens are left out of the projection vocabulary and of the
initial draw (their text does not round-trip); everything else (cosine projection, no logit scale, AdamW
with weight decay, mean over target images) follows optim_utils.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.tokenizer import BOS, EOS, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PezConfig:
    length: int = 10  # L, prompt tokens
    steps: int = 3000
    lr: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0  # initial token ids (used when no generator is passed)
    log_every: int = 100  # steps between log lines with the current best text


@dataclass
class PezResult:
    text: str  # the decoded best prompt
    similarity: float  # mean cos(CLIP_txt(tokenize(text)), f_img): what the text itself scores
    search_similarity: float  # best s of the projected ids during the search
    token_ids: list[int]  # the best projected ids (without BOS/EOS)
    best_step: int


def check_clip(clip_model) -> None:
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        if not hasattr(clip_model, name):
            raise ValueError(f"the CLIP model has no {name}: PEZ needs an open_clip CLIP with a built-in text tower "
                             "(open_clip.model.CLIP, e.g. ViT-H-14 or ViT-L-14), not a CustomTextCLIP")


def encode_text_embeddings(clip_model, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on given input embeddings [B, n, W]; ``token_ids`` [B, n] only choose the
    pooled position (argmax: the end token). Returns unnormalised text features [B, D]."""
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + clip_model.positional_embedding.to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)  # [B, n, W]
    x = pooled_text_features(x, token_ids, clip_model.text_pool_type, getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection  # [B, n, W] pooled to [B, W] -> [B, D]
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def pooled_text_features(x: torch.Tensor, token_ids: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """open_clip's text pooling, [B, n, W] -> [B, W]: the end token's row ("argmax": it has the largest id in CLIP's
    vocabulary; "eos": the first ``eos_id``), the first or last row, or no pooling."""
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    if pool_type == "argmax":
        index = token_ids.argmax(dim=-1)
    elif pool_type == "eos":
        index = (token_ids == eos_id).int().argmax(dim=-1)
    else:
        return x
    return x[torch.arange(x.shape[0], device=x.device), index]


def nearest_tokens(embeddings: torch.Tensor, vocabulary: torch.Tensor,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Proj_E: ids [L] of the vocabulary rows [V, W] with the highest cosine similarity to embeddings [L, W];
    ``allowed`` [V] (bool) limits the candidates."""
    scores = F.normalize(embeddings.float(), dim=-1) @ F.normalize(vocabulary.float(), dim=-1).T  # [L, V]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.argmax(dim=-1)


def prompt_ids(prompt: torch.Tensor, context_length: int) -> torch.Tensor:
    """[BOS, prompt…, EOS, 0 …] as open_clip tokenizes (padding 0), [context_length]."""
    ids = torch.zeros(context_length, dtype=torch.long, device=prompt.device)
    ids[0], ids[1:len(prompt) + 1], ids[len(prompt) + 1] = BOS, prompt, EOS
    return ids


def mean_cosine(text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """s = mean_n cos(t, f_img_n) for text features [1, D] and image features [N, D] (no logit scale)."""
    return (F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T).mean()


@torch.no_grad()
def text_similarity(clip_model, text: str, image_features: torch.Tensor, tokenizer: Tokenizer | None = None) -> float:
    """mean cos(CLIP_txt(tokenize(text)), f_img) with real tokenization."""
    tokenizer = tokenizer or Tokenizer(pad_token_id=0, max_length=clip_model.context_length)
    ids = tokenizer([text]).to(image_features.device)
    return float(mean_cosine(clip_model.encode_text(ids), image_features))


def search_prompt(clip_model, image_features: torch.Tensor, cfg: PezConfig = PezConfig(),
                  generator: torch.Generator | None = None, tokenizer: Tokenizer | None = None,
                  progress: bool = True) -> PezResult:
    """PEZ: the hard prompt of ``cfg.length`` tokens that best matches ``image_features`` [N, D] (from
    ``clip_model.encode_image``). ``generator`` (CPU) draws the initial token ids; default seeded by cfg.seed."""
    check_clip(clip_model)
    context = clip_model.context_length
    if not 1 <= cfg.length <= context - 2:
        raise ValueError(f"PEZ prompt length {cfg.length} must be between 1 and {context - 2} (the CLIP context "
                         "minus start and end tokens); the reference uses 10")
    if cfg.steps < 1:
        raise ValueError(f"PEZ needs at least one step, got {cfg.steps}")
    if image_features.ndim != 2:
        raise ValueError(f"image features must be [N, D], got {tuple(image_features.shape)}; pass "
                         "clip_model.encode_image(images)")
    tokenizer = tokenizer or Tokenizer(pad_token_id=0, max_length=context)
    generator = generator or torch.Generator().manual_seed(cfg.seed)
    table = clip_model.token_embedding.weight.detach()  # E [V, W]
    device = table.device
    targets = image_features.detach().to(device)
    allowed = torch.ones(len(table), dtype=torch.bool, device=device)
    allowed[[BOS, EOS]] = False  # (deviation) no start/end tokens inside the prompt

    candidates = allowed.nonzero()[:, 0]
    initial_ids = candidates[torch.randint(len(candidates), (cfg.length,), generator=generator).to(device)]
    prompt = table[initial_ids].float().clone().requires_grad_(True)  # P_0 [L, W]
    optimiser = torch.optim.AdamW([prompt], lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (-2.0, initial_ids.tolist(), 0)  # (s, ids, step)

    bar = tqdm(range(cfg.steps), disable=not progress, desc="PEZ")
    for step in bar:
        ids = nearest_tokens(prompt.detach(), table, allowed)  # Proj_E(P)
        projected = table[ids].float().clone().requires_grad_(True)  # P' [L, W]
        full_ids = prompt_ids(ids, context)[None]  # [1, n]
        fixed = table[full_ids].float()  # BOS, EOS and padding rows [1, n, W]
        embeddings = torch.cat([fixed[:, :1], projected[None], fixed[:, cfg.length + 1:]], dim=1)
        similarity = mean_cosine(encode_text_embeddings(clip_model, embeddings, full_ids), targets)  # s
        loss = 1 - similarity  # L = 1 − s
        (gradient,) = torch.autograd.grad(loss, [projected])  # ∂L/∂P'
        prompt.grad = gradient.to(prompt.dtype)  # straight-through: applied to P
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if similarity.item() > best[0]:
            best = (similarity.item(), ids.tolist(), step)
            bar.set_postfix(best=f"{best[0]:.4f}")
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log.info("PEZ step %d: s %.4f, best %.4f %r", step, similarity.item(), best[0], tokenizer.decode(best[1]))

    text = tokenizer.decode(best[1]).strip()
    final = text_similarity(clip_model, text, targets, tokenizer)
    return PezResult(text, final, best[0], best[1], best[2])
