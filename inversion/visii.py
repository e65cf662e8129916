"""Visii: learn an InstructPix2Pix instruction from one before/after example, then apply it to new images.

Paper: *Visual Instruction Inversion: Image Editing via Visual Prompting* (Nguyen, Li, Ojha, Lee, NeurIPS
2023); code: thaoshibe/visii (= WisconsinAIVision/visii) visii.py, train.py, test.py. docs/methods.md §10, §6.

Learned: the CLIP text encoder's **output hidden states** c of an instruction (cond row, [77, C]) at
positions 1 … eos−1; BOS, EOS and padding stay at their initial values (reset after every step). c starts as
CLIP(init prompt): a given text (the reference's ``prompt_type: hard``) or, with ``init_search``, the hard
prompt that PEZ (inversion/pez.py, *Hard Prompts Made Easy*) finds for the AFTER images alone with a
search CLIP (the reference's ``prompt_type: learn``: OpenCLIP ViT-H-14, length 10, 3000 steps, lr 0.1,
weight decay 0.1); the found text is then encoded by the InstructPix2Pix text encoder like a given one.

Per step (t: a shuffled permutation of 0 … 999, each once; ε ~ N(0, I); both from (seed, step)):

    z0  = 0.18215·E(after).mode()                       target latent (scaled)
    c_I = E(before).mode()                              conditioning latent (unscaled, as IP2P)
    x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε
    ε̂  = IP2P 3-way guidance over [(c, c_I), (∅, c_I), (∅, 0)] with s_T 7.5, s_I 1.5 (inside the loss)
    d_img = normalise(mean CLIP_img(after) − mean CLIP_img(before))
    t̂    = normalise(text_projection(mean over all 77 positions of c))
    L = 4·MSE(ε̂, ε) − 0.1·clamp(cos(d_img, t̂), −1, 0.5)

Non-standard, kept for agreement with the reference (docs/methods.md §10.2 pitfall 4): t̂ averages all 77 hidden
states (fixed BOS and padding included) instead of CLIP's EOS pooling, and the clamp at 0.5 stops the CLIP
term's gradient once cos > 0.5. The CLIP image tower and text projection come from an open_clip ViT-L/14
(the projection must take the IP2P text width, 768). AdamW lr 1e-3, fp32, unscaled backward; gradient value
clipping to the initial states' maximum (the reference's) is an option, off by default.

Applying: the learned [77, C] states replace CLIP(instruction) in the InstructPix2Pix editor
(``editing.instruct_pix2pix.editor.apply_instruction``). Hybrid
instruction (test.py ``test_concatenate``): the hidden states of an extra text at positions 0 … eos_extra−1
(BOS and words, encoded on their own) are pasted from position eos + 2 on, over padding states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from controls.image_condition import check_ip2p_model, image_condition, three_way_guidance
from ldm.clip_models import clip_image_features
from ldm.files import save_safetensors
from ldm.model import StableDiffusion
from ldm.pipeline import encode_images, noise_schedule_of
from ldm.schedulers import q_sample, training_target
from ldm.tokenizer import EOS

from .embedding_optimiser import EmbeddingConfig, EmbeddingResult, optimise_embedding
from .pez import PezConfig, PezResult, search_prompt


@dataclass(frozen=True)
class VisiiConfig:
    text_guidance: float = 7.5  # s_T inside the loss
    image_guidance: float = 1.5  # s_I inside the loss
    mse_weight: float = 4.0  # λ_mse
    clip_weight: float = 0.1  # λ_clip
    clip_max: float = 0.5  # upper clamp of the cosine
    clip_gradients: bool = False  # clip gradient values to the initial states' max (the reference does)


def visii_training(steps: int = 1000, lr: float = 1e-3, seed: int = 0, checkpoint_every: int = 100) -> EmbeddingConfig:
    """The engine settings of the reference: one pass over shuffled timesteps, AdamW lr 1e-3."""
    return EmbeddingConfig(steps=steps, lr=lr, timesteps="permutation", seed=seed, checkpoint_every=checkpoint_every)


# ------------------------------------------------------------------------------------------ CLIP pieces


@torch.no_grad()
def edit_direction(clip_model, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """d_img = normalise(mean CLIP_img(after) − mean CLIP_img(before)), [D]."""
    diff = clip_image_features(clip_model, after).mean(0) - clip_image_features(clip_model, before).mean(0)
    return F.normalize(diff.float(), dim=-1)


def text_direction(hidden: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """t̂ = normalise(mean over all 77 positions of hidden [77, C] @ projection [C, D]) -> [D] (non-standard:
    not CLIP's EOS pooling; see the module docstring)."""
    return F.normalize(hidden.mean(0) @ projection, dim=-1)


def visii_loss(eps_hat: torch.Tensor, eps: torch.Tensor, image_dir: torch.Tensor, text_dir: torch.Tensor,
               cfg: VisiiConfig = VisiiConfig()) -> torch.Tensor:
    """L = λ_mse·MSE(ε̂, ε) − λ_clip·clamp(cos(d_img, t̂), −1, clip_max)."""
    mse = F.mse_loss(eps_hat.float(), eps.float())
    cos = F.cosine_similarity(image_dir.float(), text_dir.float(), dim=-1).clamp(-1, cfg.clip_max)
    return cfg.mse_weight * mse - cfg.clip_weight * cos


# ----------------------------------------------------------------------------------------------- training


def end_position(model: StableDiffusion, prompt: str) -> int:
    """Position of the first end token of the encoded prompt (BOS at 0, so eos = 1 + number of tokens)."""
    ids = model.tokenizer([prompt])[0]
    return int((ids == EOS).nonzero()[0])


@dataclass
class VisiiResult:
    instruction: torch.Tensor  # the learned cond row [77, C], picked by the smoothed loss
    eos: int  # end-token position of the instruction (for hybrid instructions)
    run: EmbeddingResult  # everything the engine returns (final states, losses, …)
    init_prompt: str = ""  # the text c started from (given, or found by PEZ)
    search: PezResult | None = None  # the PEZ search, when the init prompt was searched


def search_init_prompt(search_clip, after: torch.Tensor, cfg: PezConfig = PezConfig(),
                       progress: bool = True) -> PezResult:
    """PEZ on the AFTER images only (docs/methods.md §10.1 step 2): the hard prompt matching CLIP_img(after)."""
    with torch.no_grad():
        features = clip_image_features(search_clip, after).float()  # [N, D]
    return search_prompt(search_clip, features, cfg, progress=progress)


def train_visii(model: StableDiffusion, clip_model, before: torch.Tensor, after: torch.Tensor, init_prompt: str | None,
                cfg: VisiiConfig = VisiiConfig(), train: EmbeddingConfig = visii_training(), checkpoint=None,
                resume: bool = False, stop_at: int | None = None, progress: bool = True,
                init_search: PezConfig | None = None, search_clip=None, options: dict | None = None,
                force: bool = False) -> VisiiResult:
    """Learn the instruction that turns ``before`` into ``after`` ([N, 3, H, W] in [0, 1], N pairs). With
    ``init_search`` the init prompt is found by PEZ on ``after`` with ``search_clip`` (default: ``clip_model``)
    instead of given (``init_prompt`` must then be None)."""
    check_ip2p_model(model)
    if before.shape != after.shape or before.ndim != 4 or before.shape[1] != 3:
        raise ValueError(f"before and after must both be [N, 3, H, W] images, got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}; resize them to the same size first")
    projection = clip_model.text_projection.detach().float()
    if projection.shape[0] != model.config.text.width:
        raise ValueError(f"the CLIP text projection takes width {projection.shape[0]}, the InstructPix2Pix text "
                         f"encoder has {model.config.text.width}; use CLIP ViT-L/14 (768) with SD 1.x InstructPix2Pix")
    search = None
    if init_search is not None:
        if init_prompt:
            raise ValueError("give either an init prompt or a PEZ init search, not both (pass init_prompt=None)")
        search_clip = search_clip if search_clip is not None else clip_model
        search = search_init_prompt(search_clip, after, init_search, progress)
        init_prompt = search.text
    init_prompt = init_prompt or ""
    eos = end_position(model, init_prompt)
    if eos < 2:
        raise ValueError("the init prompt is empty; give a few words to start from (e.g. 'make it look like this')")
    for part in (model.unet, model.vae, model.text_encoder):
        part.requires_grad_(False).eval()
    with torch.no_grad():
        initial = model.encode_prompt([init_prompt])[0].float()  # [77, C]
        null = model.encode_prompt([""])  # ∅_T, [1, 77, C]
    z0 = encode_images(model, after)  # 0.18215·mode
    c_image = image_condition(model, before)  # unscaled mode
    image_dir = edit_direction(clip_model, before, after).to(model.device)
    projection = projection.to(model.device)
    if cfg.clip_gradients:
        train = replace(train, clip_value=float(initial.max()))
    trainable = torch.zeros(len(initial), dtype=torch.bool)
    trainable[1:eos] = True
    alphas_cumprod = noise_schedule_of(model).alphas_cumprod.to(model.device)

    def loss_fn(hidden: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(z0), (len(t),), generator=generator) if len(z0) > 1 else torch.zeros(len(t), dtype=torch.long)
        target = z0[pick]
        noise = torch.randn(target.shape, generator=generator).to(target)
        alpha_bar = alphas_cumprod[t.to(model.device)].view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
        x_t = q_sample(target, noise, alpha_bar)  # x_t = √ᾱ z0 + √(1−ᾱ) ε
        cond = hidden.to(null.dtype).expand(len(t), *hidden.shape)  # [77, C] -> [B, 77, C]
        context = torch.cat([cond, null.expand_as(cond), null.expand_as(cond)])  # [c; ∅; ∅]
        predict = three_way_guidance(model.unet, context, c_image[pick], cfg.text_guidance, cfg.image_guidance)
        eps_hat = predict(x_t, t.to(model.device))  # training feeds x_t itself (VP form)
        goal = training_target(target, noise, alpha_bar, model.config.prediction_type)  # ε or v
        return visii_loss(eps_hat, goal, image_dir, text_direction(hidden, projection), cfg)

    run = optimise_embedding(initial, trainable, loss_fn, train, checkpoint, resume, stop_at, progress, "Visii",
                             options, force)
    return VisiiResult(run.best, eos, run, init_prompt, search)


# ----------------------------------------------------------------------------------------------- applying


def hybrid_instruction(model: StableDiffusion, instruction: torch.Tensor, eos: int, extra_text: str) -> torch.Tensor:
    """The learned [77, C] states with CLIP(extra_text)[0 : eos_extra] pasted from position eos + 2 (reference
    offset); returns a new tensor."""
    start, extra_eos = eos + 2, end_position(model, extra_text)
    if start + extra_eos > instruction.shape[0]:
        raise ValueError(f"the extra text ({extra_eos - 1} tokens) does not fit after the learned instruction "
                         f"(ends at position {eos}) within {instruction.shape[0]} positions; shorten it")
    with torch.no_grad():
        extra = model.encode_prompt([extra_text])[0].to(instruction)
    out = instruction.clone()
    out[start:start + extra_eos] = extra[:extra_eos]  # BOS and the words of the extra text, no EOS
    return out


def save_instruction(path: str | Path, instruction: torch.Tensor, eos: int, metadata: dict[str, str] | None = None) -> None:
    """{"instruction_embedding": [77, C]} with the end position in the metadata; read back by
    ``editing.instruct_pix2pix.editor.load_instruction_embedding`` and ``instruction_eos``."""
    save_safetensors(path, {"instruction_embedding": instruction.detach().float().cpu().contiguous()},
                     metadata={"eos": str(eos), **(metadata or {})})


def instruction_eos(path: str | Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get("eos")
    return int(value) if value is not None else None
