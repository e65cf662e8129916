"""Null-text inversion: per-step unconditional embeddings that make guided DDIM retrace a DDIM inversion.

Paper: *Null-text Inversion for Editing Real Images using Guided Diffusion Models* (Mokady et al., CVPR 2023),
Algorithm 1; code google/prompt-to-prompt null_text_w_ptp.ipynb ``NullInversion`` (docs/methods.md §3.1).

1. DDIM-invert z0 at guidance 1 (ddim_inversion.py): pivots z*_0 … z*_N; z̄ ← z*_N.
2. For sampling step i = 0 … N−1 (timestep t_i), ∅_i starts from ∅_{i−1} (∅_{−1} = the empty prompt's
   embedding) and Adam with lr = 1e-2·(1 − i/100) runs up to 10 iterations of

       ε̂  = ε_θ(z̄, t_i, ∅_i) + w·(ε_θ(z̄, t_i, c) − ε_θ(z̄, t_i, ∅_i))       w = 7.5, ε_θ(·, c) once, no grad
       L  = ‖DDIM_{η=0}(z̄, ε̂, t_i → t_{i+1}) − z*_{N−1−i}‖² (mean)           in latent space

   stopping early once L < 1e-5 + i·2e-5 (checked after the Adam step, as the notebook).
3. z̄ advances by one guided DDIM step with [∅_i; c], without gradient: the loop follows the optimised
   trajectory, not the pivots. Editing later starts from z*_N with context [∅_i; text] at step i.

Only ∅_i gets gradients (the backward pass is asked for ∅_i alone, so no weight gradient is computed or
stored on the model). No cache: every call optimises from scratch (docs/methods.md §3.3 item 1). ``batch`` runs the
advance step on the editing batch layout [∅_i × B; c × B] so that the edit's source row replays exactly the
same computation (docs/methods.md §3.3 item 2).

SDXL: the UNet's unconditional branch has two text inputs, the 77 × 2048 context (both encoders' hidden states)
and the pooled bigG embedding that joins the time embedding with the six size/crop numbers. ∅_i is the
context alone, as in the paper (the null-*text* embedding the cross-attention reads); the pooled embedding and
the size/crop numbers stay fixed at the empty prompt's. ∅_{−1} is the encoded empty prompt "", as in the paper
and for SD, not the zeros SDXL's guided sampling uses without a negative prompt: from zeros every one of the 77
positions is the same vector, gets the same gradient (identical keys and values attend uniformly) and stays
the same, so ∅ would have 2048 free numbers instead of 77 × 2048 (on the test model of
tests/test_sdxl_inversion.py, starting from zeros left a 40× larger reconstruction error). The edit therefore
runs its unconditional rows with the empty prompt's pooled embedding (``editing.p2p.prompt_to_prompt``). The
third-party Null-SDXL port (ugiugi0823/Null-SDXL) also starts from the empty prompt but optimises the pooled
embedding too; editlab keeps it fixed: a learned pooled vector acts on the time embedding, a global bias the
paper's method has no counterpart for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.hooks import join_guidance, split_guidance
from ldm.model import StableDiffusion
from ldm.pipeline import classifier_free_guidance, guided, guided_added, guided_unet, latent_conditioning
from ldm.schedulers import DDIMSampler
from ldm.sdxl import MicroConditioning
from ldm.unet import TextTime

from .ddim_inversion import check_deterministic, ddim_invert


@dataclass(frozen=True)
class NullTextConfig:
    guidance: float = 7.5  # w of the guided sampling the embeddings are fitted for
    inner_steps: int = 10  # Adam iterations per step (at most)
    learning_rate: float = 1e-2  # lr at step i: learning_rate·(1 − i/100)
    epsilon: float = 1e-5  # early stop at step i once the loss < epsilon + i·epsilon_slope
    epsilon_slope: float = 2e-5


def step_learning_rate(i: int, config: NullTextConfig) -> float:
    """lr_i = lr·(1 − i/100) (fixed to 100 whatever the number of steps, as the notebook)."""
    return config.learning_rate * (1.0 - i / 100.0)


def early_stop_threshold(i: int, config: NullTextConfig) -> float:
    """Step i stops iterating once its loss falls below ε + i·2e-5."""
    return config.epsilon + i * config.epsilon_slope


def optimise_embedding(loss_of: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, lr: float,
                       iterations: int, threshold: float) -> tuple[torch.Tensor, list[float]]:
    """Adam on one embedding: step, then stop if the loss of that iteration was below ``threshold``.
    Returns the embedding (detached) and the loss of every iteration run."""
    embedding = start.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(iterations):
            loss = loss_of(embedding)
            optimizer.zero_grad()
            loss.backward(inputs=[embedding])  # gradients for ∅ only, none on the model's weights
            optimizer.step()
            losses.append(loss.item())
            if losses[-1] < threshold:
                break
    return embedding.detach(), losses


@dataclass
class NullTextInversion:
    pivots: list[torch.Tensor]  # z*_0 … z*_N from DDIM inversion, [1, C, h, w] each
    null_embeddings: list[torch.Tensor]  # ∅_i for sampling step i, [1, L, C] each
    losses: list[list[float]]  # per step, the loss of each inner iteration
    reconstruction: torch.Tensor  # z̄ after the last step: what guided sampling with ∅_i regenerates
    null_added: TextTime | None = None  # SDXL: the fixed pooled embedding and size/crop numbers of ∅'s rows

    @property
    def noise(self) -> torch.Tensor:
        """x_T = z*_N: where the reconstruction and every edit start."""
        return self.pivots[-1]


def null_text_inversion(model: StableDiffusion, latents: torch.Tensor, prompt: str, sampler: DDIMSampler,
                        config: NullTextConfig = NullTextConfig(), inversion_guidance: float = 1.0,
                        batch: int = 1, progress: bool = False,
                        micro: MicroConditioning | None = None) -> NullTextInversion:
    """Null-text inversion of one latent [1, C, h, w] under ``prompt`` (see the module docstring).
    ``micro``: SDXL's size/crop conditioning (default: the image size, crop (0, 0))."""
    check_deterministic(sampler)
    if not guided(config.guidance):
        raise ValueError(f"null-text inversion fits the unconditional branch of guidance, which guidance "
                         f"{config.guidance} does not use; plain DDIM inversion reconstructs at w <= 1")
    if len(sampler.timesteps) > 100:
        raise ValueError(f"null-text inversion's learning rate 1e-2·(1 − i/100) is defined for at most 100 "
                         f"steps, got {len(sampler.timesteps)}; use fewer steps")
    pivots = ddim_invert(model, latents, prompt, sampler, guidance=inversion_guidance, progress=progress,
                         micro=micro)
    unet, w = model.unet, config.guidance
    with torch.no_grad():  # [∅_{−1}; c] with ∅_{−1} the empty prompt's encoding (SDXL: and its pooled rows)
        context, added = latent_conditioning(model, [prompt], "", w, latents, micro)
        null, cond = split_guidance(context)
        null = null.float()
    null_added, cond_added = (None, None) if added is None else (added.rows(slice(0, 1)), added.rows(slice(1, 2)))
    cond_unet = guided_unet(unet, cond, 1.0, added=cond_added)  # w = 1: one UNet call on the given rows
    z = pivots[-1]
    steps = len(sampler.timesteps)
    embeddings, all_losses = [], []
    for i in tqdm(range(steps), disable=not progress, leave=False, desc="null-text inversion"):
        t, target = sampler.timesteps[i], pivots[steps - 1 - i]
        with torch.no_grad():
            out_cond = cond_unet(sampler.scale_model_input(z, i), t)

        def loss_of(embedding: torch.Tensor) -> torch.Tensor:
            uncond_unet = guided_unet(unet, embedding.to(cond.dtype), 1.0, added=null_added)
            out_uncond = uncond_unet(sampler.scale_model_input(z, i), t)
            guided = classifier_free_guidance(out_uncond, out_cond, w)
            previous = sampler.step(guided, i, z)  # DDIM η = 0 (v output is converted to ε inside)
            return torch.nn.functional.mse_loss(previous.float(), target.float())

        null, losses = optimise_embedding(loss_of, null, step_learning_rate(i, config), config.inner_steps,
                                          early_stop_threshold(i, config))
        embeddings.append(null.to(cond.dtype))
        all_losses.append(losses)
        with torch.no_grad():  # advance along the optimised trajectory, on the editing batch layout
            context = join_guidance(null.to(cond.dtype).expand(batch, -1, -1), cond.expand(batch, -1, -1))
            rows = z.expand(batch, -1, -1, -1)
            predict = guided_unet(unet, context, w, added=guided_added(null_added, cond_added, batch))
            z = sampler.step(predict(sampler.scale_model_input(rows, i), t), i, rows)[:1]
    return NullTextInversion(pivots, embeddings, all_losses, z, null_added)


def null_text_predictor(unet, null_embeddings: list[torch.Tensor], cond: torch.Tensor, guidance: float, sampler,
                        added: TextTime | None = None):
    """predict(x_in, t) for B rows with context [∅_i × B; cond] at the step i of timestep t (editing an
    inverted image). ``added``: SDXL's pooled embeddings and size/crop numbers for the UNet's rows
    ([uncond × B; cond × B] under guidance, the B conditional rows without)."""
    step_of = {int(t): i for i, t in enumerate(sampler.timesteps)}

    def predict(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided(guidance):  # no unconditional branch to replace
            return guided_unet(unet, cond, guidance, added=added)(x_in, t)
        null = null_embeddings[step_of[int(t)]].to(cond.dtype).expand(cond.shape[0], -1, -1)
        return guided_unet(unet, join_guidance(null, cond), guidance, added=added)(x_in, t)

    return predict
