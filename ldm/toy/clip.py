"""The toy CLIP: open_clip's own ``CLIP`` class at a tiny size, trained contrastively here on the toy world,
so that the methods that need CLIP (Visii's direction term, the make-pairs CLIP filters, IP-Adapter's image
encoder) run on the bundled toy model with no download.

Paper: *Learning Transferable Visual Models From Natural Language Supervision* (Radford et al., 2021).

    u_i = normalise(W_img · ViT(x_i)[cls]),   v_j = normalise(W_txt · T(y_j)[eos])
    logits_ij = e^τ · u_i · v_j
    L = ½ (CE(logits, P) + CE(logitsᵀ, Pᵀ)),  P_ij = 1[y_i = y_j] / #{k : y_k = y_i}

P spreads each row's target over the batch items with the same caption (the toy world has 150 distinct
captions, so a batch repeats some; plain CLIP would push identical captions apart).

The text tower is **locked** to the toy diffusion model's own text encoder (toy-sd.safetensors, converted to
open_clip's layout by ``open_clip_text_state``), as Stable Diffusion 1.x's text encoder is CLIP ViT-L/14's
text tower: so ``text_projection`` maps the diffusion model's hidden states into the joint space, which is
what Visii's CLIP term reads (it projects the InstructPix2Pix text encoder's states with it). Only the image
tower, the text projection and the temperature τ learn (LiT, *Zhai et al. 2022*, with the roles swapped).
The shipped file therefore holds no text tower: ``load_toy_clip`` fills it from toy-sd.safetensors, named
with its SHA-256 in the file's metadata, as toy-ip2p.safetensors takes its VAE and text encoder from there.

Zero-shot reading (``zero_shot_accuracy``): the class embedding of colour c is the mean of the normalised
text embeddings of every caption with object colour c (prompt ensembling over shapes and backgrounds, CLIP
§3.1.4); an image is assigned the class with the highest cosine. The same for shape and background.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..clip_vision import CLIP_MEAN, CLIP_STD
from ..files import atomic_path, file_sha256
from ..training import Trainer, TrainConfig
from .shapes import COLOURS, SHAPES, ShapesDataset, ShapeSpec, caption

log = logging.getLogger(__name__)

# open_clip model config (the JSON open_clip's CLIP(**config) takes). The text tower is the toy diffusion
# model's (ldm/config.py tiny_text(64): 2 layers, width 64, 4 heads, QuickGELU), so quick_gelu is on for
# both towers. The image tower sees the toy world's 64×64 images unresized, as 8×8 patches.
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 4.0},
}
CLIP_RECIPE = "editlab-toy-clip-v1"


@dataclass(frozen=True)
class ClipRecipe:
    seed: int = 0  # initialisation and per-step draws
    data_seed: int = 4321  # rendered training images (not the diffusion model's pool: 1234)
    eval_seed: int = 98765  # held-out images of the zero-shot measurement
    pool: int = 8192
    steps: int = 600
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100


# ------------------------------------------------------------------------------- the locked text tower


def open_clip_text_state(text_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """editlab (= transformers CLIPTextModel) text encoder keys -> open_clip text tower keys; the inverse of
    weights_convert/ldm_text.py's open_clip rules (q, k, v concatenated into in_proj, in that order)."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    leaves = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {}
    for key, tensor in text_state.items():
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            continue  # position_ids and the like
        layer, leaf, kind = m.groups()
        if leaf in leaves:
            out[f"transformer.resblocks.{layer}.{leaves[leaf]}.{kind}"] = tensor
        elif leaf == "self_attn.q_proj":
            q, k, v = (text_state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv")
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([q, k, v])
    return out


def toy_text_state(toy_weights: Path) -> dict[str, torch.Tensor]:
    """The toy diffusion model's text encoder, in open_clip's text-tower layout (fp32)."""
    from ..model import read_editlab_file

    _, tensors = read_editlab_file(toy_weights)
    prefix = "text_encoder."
    text = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    if not text:
        raise ValueError(f"{toy_weights}: no text encoder in this file; pass the toy text-to-image weights")
    return open_clip_text_state(text)


def toy_clip_model(toy_weights: Path):
    """A fresh open_clip CLIP of TOY_CLIP_CONFIG with the toy text tower loaded and frozen."""
    import open_clip

    model = open_clip.model.CLIP(**TOY_CLIP_CONFIG)
    missing, unexpected = model.load_state_dict(toy_text_state(toy_weights), strict=False)
    text_left = [k for k in missing if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")]
    if text_left or unexpected:
        raise ValueError(f"{toy_weights}: its text encoder does not fit the toy CLIP's text tower "
                         f"(missing {text_left[:3]}, unexpected {unexpected[:3]})")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual.") or name in ("text_projection", "logit_scale"))
    return model


def load_toy_clip(path: Path, toy_weights: Path | None = None):
    """The shipped toy CLIP: its image tower, projection and τ from ``path``, the text tower from the toy
    diffusion weights its metadata names (beside it unless ``toy_weights``), checked by SHA-256."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    toy_weights = Path(toy_weights or Path(path).with_name(meta["text_tower"]))
    if not toy_weights.is_file():
        raise FileNotFoundError(f"{path}: its text tower comes from {toy_weights}, which is missing")
    if meta.get("text_tower_sha256") and file_sha256(toy_weights) != meta["text_tower_sha256"]:
        raise ValueError(f"{path} was trained on another text encoder than {toy_weights}'s (SHA-256 differs); "
                         "retrain it with editlab train-toy --stage clip")
    model = toy_clip_model(toy_weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith("visual.") or k in ("text_projection", "logit_scale")]:
        raise ValueError(f"{path}: not a toy CLIP file (unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------- training


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, 64, 64] -> the image tower's input, x' = (x/255 − μ) / σ (CLIP statistics)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (images.float() / 255 - mean) / std


def render_images(n: int, seed: int) -> tuple[torch.Tensor, list[ShapeSpec]]:
    """n toy images (uint8 [n, 3, 64, 64]) and their specs."""
    data = ShapesDataset(n, seed)
    items = [data[i] for i in range(n)]
    images = torch.stack([((it["image"] + 1) * 127.5).round().to(torch.uint8) for it in items])
    return images, [it["spec"] for it in items]


def all_captions() -> list[str]:
    """Every caption the toy world can produce (6 colours × 5 shapes × 5 other backgrounds = 150)."""
    return [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def text_embeddings(model, captions: list[str]) -> torch.Tensor:
    """EOS-pooled, projected text embeddings [N, D]; the tower is locked, so this runs once per caption."""
    import open_clip

    return model.encode_text(open_clip.tokenize(captions, context_length=model.context_length))


def contrastive_loss(model, images: torch.Tensor, caption_ids: torch.Tensor, text_hidden: torch.Tensor) -> torch.Tensor:
    """L = ½(CE(logits, P) + CE(logitsᵀ, Pᵀ)) with P spread over equal captions (module docstring).
    ``text_hidden``: the locked tower's pooled states [N_captions, width], before text_projection."""
    u = F.normalize(model.encode_image(pixels(images)), dim=-1)
    v = F.normalize(text_hidden[caption_ids] @ model.text_projection, dim=-1)
    logits = model.logit_scale.exp() * u @ v.T  # [B, B]
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)  # symmetric, so the same P for both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@torch.no_grad()
def pooled_text_states(model, captions: list[str]) -> torch.Tensor:
    """The locked tower's EOS states after ln_final [N, width] (encode_text without the projection)."""
    saved = model.text_projection.data.clone()
    model.text_projection.data = torch.eye(saved.shape[0])
    try:
        return text_embeddings(model, captions)
    finally:
        model.text_projection.data = saved


@torch.no_grad()
def zero_shot_accuracy(model, images: torch.Tensor, specs: list[ShapeSpec]) -> dict[str, float]:
    """Fraction of ``images`` whose object colour, shape and background the CLIP reads right, each class
    embedded as the mean of its captions' normalised text embeddings (module docstring)."""
    captions = all_captions()
    text = F.normalize(text_embeddings(model.eval(), captions), dim=-1)
    image = F.normalize(model.encode_image(pixels(images)), dim=-1)
    words = [c.split() for c in captions]  # "a", colour, shape, "on", "a", background, "background"
    result = {}
    for attribute, position, names in (("colour", 1, tuple(COLOURS)), ("shape", 2, SHAPES),
                                       ("background", 5, tuple(COLOURS))):
        classes = torch.stack([F.normalize(text[[w[position] == n for w in words]].mean(0), dim=-1) for n in names])
        guess = (image @ classes.T).argmax(1)
        truth = torch.tensor([names.index(getattr(s, attribute)) for s in specs])
        result[attribute] = float((guess == truth).float().mean())
    return result


def train_toy_clip(out: Path, toy_weights: Path, recipe: ClipRecipe = ClipRecipe(), resume: bool = False,
                   stop_at: int | None = None) -> Path:
    """Train into folder ``out`` (checkpoint clip-checkpoint.pt); writes out/toy-clip.safetensors: the image
    tower, text projection and τ in fp16, the open_clip config and the zero-shot accuracies in its metadata."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)  # initialisation of the image tower and projection
    model = toy_clip_model(toy_weights)
    captions = all_captions()
    index = {c: i for i, c in enumerate(captions)}
    images, specs = render_images(recipe.pool, recipe.data_seed)
    ids = torch.tensor([index[caption(s)] for s in specs])
    hidden = pooled_text_states(model, captions)  # [150, 64], fixed: the tower is locked

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(images), (recipe.batch,), generator=generator)
        return contrastive_loss(model, images[pick], ids[pick], hidden)

    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup=min(recipe.warmup, recipe.steps // 10),
                      seed=recipe.seed, checkpoint_every=100, weight_decay=0.1)
    trainer = Trainer(model, loss_fn, cfg, out / "clip-checkpoint.pt", "toy CLIP")
    losses = trainer.run(resume=resume and (out / "clip-checkpoint.pt").is_file(), stop_at=stop_at)
    if trainer.step < recipe.steps:
        return out / "clip-checkpoint.pt"
    held_out, held_specs = render_images(512, recipe.eval_seed)
    accuracy = zero_shot_accuracy(model, held_out, held_specs)
    log.info("toy CLIP: loss %.4f, zero-shot accuracy %s", sum(losses[-50:]) / 50, accuracy)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if k.startswith("visual.") or k in ("text_projection", "logit_scale")}
    meta = {"format": "open_clip", "open_clip_config": json.dumps(TOY_CLIP_CONFIG, sort_keys=True),
            "text_tower": toy_weights.name, "text_tower_sha256": file_sha256(toy_weights), "recipe": CLIP_RECIPE,
            "recipe_settings": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
            "zero_shot_accuracy": json.dumps(accuracy, sort_keys=True), "final_loss": f"{sum(losses[-50:]) / 50:.4f}"}
    from safetensors.torch import save_file

    path = out / "toy-clip.safetensors"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=dict(sorted(meta.items())))
    return path
