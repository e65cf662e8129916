"""Textual inversion: learn a new word S* from a few images of one concept.

Paper: *An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion*
(Gal et al., ICLR 2023); code followed for conventions: rinongal/textual_inversion, diffusers
examples/textual_inversion/textual_inversion.py and loaders/textual_inversion.py. docs/methods.md §11,
docs/checkpoints.md §11.

- A placeholder token (e.g. "<cat-toy>", plus "<cat-toy>_1", "<cat-toy>_2", … for k > 1 vectors, as diffusers)
  gets k new rows v_1 … v_k of the token embedding table, initialised from a single-token initializer word.
  Everything else is frozen; the new rows are a separate parameter (the table itself is never trained).
- Loss (paper eq. 2), per image x and caption template y ("a photo of a {}", …):

      z0 = 0.18215·z,  z ~ q(z | x)             (a posterior sample, as the diffusers script)
      x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,  t ~ U{0 … 999}
      L = ‖ε − ε_θ(x_t, t, CLIP(y(S*)))‖²      (v-models: target v = √ᾱ ε − √(1−ᾱ) z0)

- Files: diffusers' ``learned_embeds.safetensors`` {token: [d] or [k, d]} is written and read; the A1111 /
  original ``.pt`` ({"string_to_param": {"*": [k, d]}, "name": …}) is read with ``weights_only=True``.

Loading an embedding extends the model in place (as diffusers' ``load_textual_inversion`` extends a
pipeline): the token table grows by k rows and ``model.tokenizer`` becomes a ``PlaceholderTokenizer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.files import save_safetensors
from ldm.model import StableDiffusion
from ldm.pipeline import noise_schedule_of
from ldm.schedulers import q_sample, training_target
from ldm.tokenizer import Tokenizer

from .embedding_optimiser import EmbeddingConfig, EmbeddingResult, optimise_embedding

TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
             "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
             "a good photo of a {}", "a photo of one {}", "a photo of the small {}")  # short, as the references


def placeholder_names(token: str, vectors: int) -> list[str]:
    """"<cat-toy>", 3 -> ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"] (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


class PlaceholderTokenizer(Tokenizer):
    """editlab's CLIP tokenizer plus added tokens, matched in the text before BPE (as transformers' added
    tokens). A placeholder with k vectors expands to its k ids wherever the first name appears."""

    def __init__(self, base: Tokenizer, added: dict[str, list[int]]):
        super().__init__(base.pad_token_id, base.max_length)
        self.added = dict(getattr(base, "added", {}), **added)  # name -> ids it stands for
        names = sorted(self.added, key=len, reverse=True)  # longest first: "<t>_1" before "<t>"
        self._pattern = re.compile("|".join(re.escape(n) for n in names))

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in self._pattern.finditer(text):
            ids += super().encode(text[start:match.start()]) + self.added[match.group()]
            start = match.end()
        return ids + super().encode(text[start:])

    def decode(self, ids: list[int]) -> str:
        names = {v[0]: n for n, v in self.added.items()}  # "<t>" -> first id, "<t>_1" -> second, …
        words, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in names:
                words += [super().decode(run).strip()] if run else []
                words += [names[i]] if i is not None else []
                run = []
            else:
                run.append(i)
        return " ".join(w for w in words if w)


def check_new_token(model: StableDiffusion, token: str, vectors: int) -> None:
    """A placeholder must be new: neither a CLIP word (one BPE token) nor an already added token."""
    added = getattr(model.tokenizer, "added", {})
    for name in placeholder_names(token, vectors):
        if name in added or len(Tokenizer().encode(name)) == 1 or not name.strip():
            raise ValueError(f"token {name!r} already exists (or is empty); choose a new placeholder such as "
                             "'<my-thing>'")


def _table(model: StableDiffusion, encoder: str = "text_encoder") -> nn.Embedding:
    return getattr(model, encoder).text_model.embeddings.token_embedding


def init_rows(model: StableDiffusion, init_word: str, vectors: int) -> torch.Tensor:
    """k copies of the initializer word's embedding row ([k, d]); the word must be one BPE token."""
    ids = model.tokenizer.encode(init_word)
    if len(ids) != 1:
        raise ValueError(f"initializer word {init_word!r} is {len(ids)} tokens; choose a word that is a single "
                         "CLIP token (e.g. 'toy', 'sculpture')")
    return _table(model).weight[ids[0]].detach().float().repeat(vectors, 1)  # [d] -> [k, d]


def add_placeholder(model: StableDiffusion, token: str, rows: torch.Tensor, encoder: str = "text_encoder") -> None:
    """Append ``rows`` ([k, d] or [d]) to the token table under ``token`` (+ "_1" …); extends ``model``.
    ``encoder``: "text_encoder" or SDXL's "text_encoder_2" (its tokenizer is "tokenizer_2")."""
    tokenizer_name = "tokenizer" if encoder == "text_encoder" else "tokenizer_2"
    rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim == 1 else rows
    table = _table(model, encoder)
    if rows.ndim != 2 or rows.shape[1] != table.embedding_dim:
        raise ValueError(f"embedding of shape {tuple(rows.shape)} does not fit this text encoder (width "
                         f"{table.embedding_dim}); SD 1 (768) and SD 2 (1024) embeddings are not interchangeable")
    if encoder == "text_encoder":
        check_new_token(model, token, len(rows))
    names = placeholder_names(token, len(rows))
    first = table.num_embeddings
    grown = nn.Embedding(first + len(rows), table.embedding_dim).to(table.weight.device, table.weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table.weight, rows.to(table.weight)]))  # [V, d] -> [V + k, d]
    getattr(model, encoder).text_model.embeddings.token_embedding = grown
    ids = list(range(first, first + len(rows)))
    added = {token: ids, **{n: [i] for n, i in zip(names[1:], ids[1:])}}
    setattr(model, tokenizer_name, PlaceholderTokenizer(getattr(model, tokenizer_name), added))


def encode_with_rows(model: StableDiffusion, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Text hidden states [B, 77, d] for ``ids`` whose ids ≥ V (the table size) name ``rows`` ([k, d], learnable)."""
    table = _table(model).weight
    full = torch.cat([table, rows.to(table.dtype)])  # [V, d] + [k, d] -> [V + k, d]; gradients reach rows only
    pos = model.text_encoder.text_model.embeddings.position_embedding.weight[: ids.shape[1]]
    return model.text_encoder(inputs_embeds=F.embedding(ids, full) + pos)


@dataclass(frozen=True)
class InversionData:
    means: torch.Tensor  # q(z | x) of every image: mean and std, [N, 4, h, w] each
    stds: torch.Tensor
    caption_ids: torch.Tensor  # every template with the placeholder, [M, 77]


@torch.no_grad()
def prepare_data(model: StableDiffusion, images: torch.Tensor, token: str, vectors: int,
                 templates=TEMPLATES) -> InversionData:
    """Encode the images once and tokenize each template around the placeholder (ids V … V+k−1)."""
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be [N, 3, H, W] in [0, 1] with N >= 1, got {tuple(images.shape)}")
    first = _table(model).num_embeddings
    tokenizer = PlaceholderTokenizer(model.tokenizer, {token: list(range(first, first + vectors))})
    posterior = model.vae.encode((images * 2 - 1).to(model.device, model.vae.dtype))
    return InversionData(posterior.mean, posterior.std, tokenizer([t.format(token) for t in templates]))


def inversion_loss(model: StableDiffusion, data: InversionData):
    """The per-step loss of the module docstring; its draws come from the step's generator."""
    alphas_cumprod = noise_schedule_of(model).alphas_cumprod.to(model.device)

    def loss_fn(rows: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = len(t)
        pick = torch.randint(len(data.means), (batch,), generator=generator)
        caption = torch.randint(len(data.caption_ids), (batch,), generator=generator)
        mean, std = data.means[pick], data.stds[pick]
        z0 = model.vae.scale_latents(mean + std * torch.randn(mean.shape, generator=generator).to(mean))  # s·z
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        alpha_bar = alphas_cumprod[t.to(model.device)].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(z0, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        context = encode_with_rows(model, data.caption_ids[caption].to(model.device), rows)
        output = model.unet(x_t, t.to(model.device), context)
        target = training_target(z0, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return F.mse_loss(output.float(), target.float())

    return loss_fn


def train_textual_inversion(model: StableDiffusion, images: torch.Tensor, token: str, init_word: str,
                            vectors: int = 1, cfg: EmbeddingConfig = EmbeddingConfig(steps=3000, lr=5e-3, batch=1),
                            checkpoint=None, resume: bool = False, stop_at: int | None = None,
                            progress: bool = True, options: dict | None = None, force: bool = False,
                            templates=TEMPLATES) -> EmbeddingResult:
    """Learn ``vectors`` rows for ``token`` from ``images`` [N, 3, H, W] in [0, 1]; the model stays frozen
    and unchanged (``add_placeholder`` installs the result). ``templates``: the captions, "{}" standing for
    the token. Returns the engine's result: ``best`` [k, d]."""
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"caption templates must each hold '{{}}' once (where the token goes), got {list(templates)}")
    if vectors < 1:
        raise ValueError(f"vectors must be >= 1, got {vectors}")
    check_new_token(model, token, vectors)
    for part in (model.unet, model.vae, model.text_encoder):
        part.requires_grad_(False).eval()
    initial = init_rows(model, init_word, vectors)
    data = prepare_data(model, images, token, vectors, templates)
    return optimise_embedding(initial, torch.ones(vectors, dtype=torch.bool), inversion_loss(model, data), cfg,
                              checkpoint, resume, stop_at, progress, f"textual inversion {token}", options, force)


# ------------------------------------------------------------------------------------------------- files


def save_learned_embeds(path: str | Path, token: str, rows: torch.Tensor) -> None:
    """diffusers' learned_embeds.safetensors: {token: [d]} for one vector, {token: [k, d]} for k > 1."""
    rows = rows.detach().float().cpu()
    tensor = rows[0] if rows.ndim == 2 and len(rows) == 1 else rows
    save_safetensors(path, {token: tensor.contiguous()})


def read_embedding_file(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(token name stored in the file or None, rows [k, d]) from a diffusers .safetensors / .bin, an A1111 or
    original .pt (string_to_param), a kohya file (emb_params) or a bare tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embedding file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        content = load_file(str(path))
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a readable embedding file ({err.__class__.__name__}); expected a "
                             "diffusers learned_embeds file or an A1111 .pt") from None
    name = None
    if isinstance(content, dict) and {"clip_l", "clip_g"} <= set(content):
        raise ValueError(f"{path}: an SDXL embedding (clip_l and clip_g); it fits SDXL models only")
    if isinstance(content, dict) and any(k.startswith("string_to_param.") for k in content):  # flattened A1111
        content = {"string_to_param": {k: v for k, v in content.items() if k.startswith("string_to_param.")}}
    if isinstance(content, dict) and "string_to_param" in content:  # A1111 / original
        name = content.get("name") if isinstance(content.get("name"), str) else None
        content = next(iter(content["string_to_param"].values()))
    elif isinstance(content, dict) and "emb_params" in content:  # kohya
        content = content["emb_params"]
    elif isinstance(content, dict):
        if len(content) != 1:
            raise ValueError(f"{path}: holds {len(content)} tensors; a diffusers embedding holds one {{token: tensor}}")
        name, content = next(iter(content.items()))
    if not isinstance(content, torch.Tensor) or content.ndim not in (1, 2):
        raise ValueError(f"{path}: the embedding must be a [d] or [k, d] tensor")
    return name, content.float().reshape(-1, content.shape[-1])


def read_sdxl_embedding_file(path: str | Path) -> dict[str, torch.Tensor] | None:
    """SDXL's format, one safetensors file with a row block per text encoder: {"clip_l": [k, 768],
    "clip_g": [k, 1280]}; None for a file of another format."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors.torch import load_file

    content = load_file(str(path))
    if set(content) != {"clip_l", "clip_g"}:
        return None
    rows = {k: v.float().reshape(-1, v.shape[-1]) for k, v in content.items()}
    if len(rows["clip_l"]) != len(rows["clip_g"]):
        raise ValueError(f"{path}: clip_l has {len(rows['clip_l'])} vectors and clip_g {len(rows['clip_g'])}; "
                         "an SDXL embedding has as many for each text encoder")
    return rows


def load_textual_inversion(model: StableDiffusion, path: str | Path, token: str | None = None) -> str:
    """Install the embedding of ``path`` in ``model`` under ``token`` (default: the name in the file).
    Returns the token to write in prompts. SDXL models take SDXL embeddings ({"clip_l", "clip_g"}: the
    rows of each text encoder, under the same token in both tokenizers); these files name no token."""
    sdxl_rows = read_sdxl_embedding_file(path)
    if (sdxl_rows is not None) != model.is_sdxl:
        raise ValueError(f"{path}: an {'SDXL' if sdxl_rows is not None else 'SD 1.x/2.x'} embedding for an "
                         f"{model.config.family} model; use an embedding trained for this model")
    if sdxl_rows is not None:
        if not token:
            raise ValueError(f"{path}: SDXL embeddings name no token; pass one (e.g. token='<my-thing>')")
        add_placeholder(model, token, sdxl_rows["clip_l"], "text_encoder")
        add_placeholder(model, token, sdxl_rows["clip_g"], "text_encoder_2")
        return token
    name, rows = read_embedding_file(path)
    token = token or name
    if not token:
        raise ValueError(f"{path}: the file names no token; pass one (e.g. token='<my-thing>')")
    add_placeholder(model, token, rows)
    return token
