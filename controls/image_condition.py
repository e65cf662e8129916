"""InstructPix2Pix's image conditioning: an 8-channel UNet conditioned on an input image, and the three-way
classifier-free guidance over (instruction, image), as in *InstructPix2Pix: Learning to Follow Image Editing
Instructions* (Brooks, Holynski, Efros, CVPR 2023), eq. 3.

Like ControlNet and the IP-Adapter, a conditioning added to a Stable Diffusion UNet; here the UNet's first
convolution reads [noisy latent z_t (4) ‖ image latent c_I (4)]. The editor (editing/instruct_pix2pix/) and
Visii's loss (inversion/visii.py) both sample through it.

- c_I = E(x).mode(), **unscaled** (no 0.18215); ∅_I is an all-zero latent, ∅_T the CLIP hidden states of "".
- rows [(c_T, c_I), (∅_T, c_I), (∅_T, ∅_I)];
  ε̃ = row2 + s_I·(row1 − row2) + s_T·(row0 − row1).
- SDXL (diffusers' 8-channel SDXL editing UNet): the same rows and formula; c_T from both text encoders
  with the pooled embedding and size numbers; ∅_T all zeros (diffusers' default for a missing negative
  prompt); c_I again the unscaled posterior mode.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ldm.model import StableDiffusion
from ldm.pipeline import Predictor
from ldm.sdxl import MicroConditioning
from ldm.sdxl import encode_prompt as sdxl_encode_prompt
from ldm.unet import TextTime


def check_ip2p_model(model: StableDiffusion) -> None:
    """The UNet must take [noisy latent ‖ image latent]: twice the VAE's latent channels."""
    expected = 2 * model.config.vae.latent_channels
    if model.config.unet.in_channels != expected:
        raise ValueError(f"this model's UNet takes {model.config.unet.in_channels} input channels, InstructPix2Pix "
                         f"needs {expected} (noisy latent + image latent); convert an InstructPix2Pix checkpoint "
                         "(e.g. instruct-pix2pix-00-22000.ckpt) with 'editlab convert' and pass it with --weights")


@torch.no_grad()
def image_condition(model: StableDiffusion, images: torch.Tensor) -> torch.Tensor:
    """c_I = E(2x − 1).mode(): images [B, 3, H, W] in [0, 1] -> latents [B, 4, H/f, W/f], NOT multiplied by
    the 0.18215 scaling factor (the training convention; scaling it silently degrades edits)."""
    vae = model.vae
    posterior = vae.encode((images * 2 - 1).to(model.device, vae.dtype))
    return posterior.mode()


def instruction_context(model: StableDiffusion, instructions: Sequence[str] | None, batch: int,
                        instruction_embedding: torch.Tensor | None = None, negative: str | None = None) -> torch.Tensor:
    """Cross-attention context of the three rows, [c_T; ∅_T; ∅_T] ([3B, 77, C]); ∅_T is the empty prompt, or
    the ``negative`` prompt (as diffusers' InstructPix2Pix pipeline).

    c_T is CLIP(instruction), or ``instruction_embedding`` ([77, C] or [B, 77, C]) used as it is: the hook for
    a learned instruction (Visii, docs/methods.md §10) that replaces the encoded text; gradients flow back to it.
    """
    if (instructions is None) == (instruction_embedding is None):
        raise ValueError("give either instructions or an instruction embedding (exactly one of the two)")
    if instructions is not None and len(instructions) != batch:
        raise ValueError(f"{len(instructions)} instructions for {batch} images; give one instruction per image")
    with torch.no_grad():
        null = model.encode_prompt([negative or ""] * batch)  # ∅_T
        cond = model.encode_prompt(list(instructions)) if instructions is not None else None
    if cond is None:
        cond = _embedding_batch(instruction_embedding, batch, tuple(null.shape[1:])).to(null.device, null.dtype)
    return torch.cat([cond, null, null])  # 3 × [B, 77, C] -> [3B, 77, C]


def _embedding_batch(embedding: torch.Tensor, batch: int, shape: tuple[int, int]) -> torch.Tensor:
    if embedding.ndim == 2:
        embedding = embedding[None]  # [77, C] -> [1, 77, C]
    if embedding.ndim != 3 or tuple(embedding.shape[1:]) != shape or embedding.shape[0] not in (1, batch):
        raise ValueError(f"instruction embedding of shape {tuple(embedding.shape)} does not fit this model; "
                         f"it must be [{shape[0]}, {shape[1]}] (or [{batch}, {shape[0]}, {shape[1]}])")
    return embedding.expand(batch, *shape)


def sdxl_instruction_conditioning(model: StableDiffusion, instructions: Sequence[str] | None, batch: int,
                                  height: int, width: int) -> tuple[torch.Tensor, TextTime]:
    """SDXL's three rows: context [c_T; ∅_T; ∅_T] and the added conditioning (pooled text, size numbers).
    ∅_T is all zeros, context and pooled embedding alike, as diffusers' StableDiffusionXLInstructPix2PixPipeline
    (``force_zeros_for_empty_prompt``) conditions its model; the six numbers are the image size and crop (0, 0)."""
    if instructions is None:
        raise ValueError("a learned instruction embedding is not supported on SDXL yet; give an instruction")
    if len(instructions) != batch:
        raise ValueError(f"{len(instructions)} instructions for {batch} images; give one instruction per image")
    with torch.no_grad():
        cond, pooled = sdxl_encode_prompt(model, list(instructions))
    ids = torch.tensor([MicroConditioning().time_ids(height, width)] * batch, dtype=cond.dtype, device=cond.device)
    null, null_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    return (torch.cat([cond, null, null]),
            TextTime(torch.cat([pooled, null_pooled, null_pooled]), torch.cat([ids, ids, ids])))


def three_way_guidance(unet, context: torch.Tensor, image_latents: torch.Tensor, text_scale: float,
                       image_scale: float, added: TextTime | None = None) -> Predictor:
    """predict(x_in, t) = row2 + s_I(row1 − row2) + s_T(row0 − row1) over the rows
    [(c_T, c_I), (∅_T, c_I), (∅_T, ∅_I)]; ``context`` is [c_T; ∅_T; ∅_T], ``image_latents`` c_I ([B, 4, h, w])."""
    extra = {} if added is None else {"added": added}  # SD 1.x UNets (and wrappers of them) take three inputs
    image_rows = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])  # [c_I; c_I; ∅_I]

    def predict(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([x_in, x_in, x_in])  # [B, 4, h, w] -> [3B, 4, h, w]
        unet_in = torch.cat([rows, image_rows.to(rows.dtype)], dim=1)  # -> [3B, 8, h, w]
        full, image_only, unconditional = unet(unet_in, t, context, **extra).chunk(3)  # -> 3 × [B, 4, h, w]
        return (unconditional
                + text_scale * (full - image_only)  # s_T (ε(c_T, c_I) − ε(∅_T, c_I))
                + image_scale * (image_only - unconditional))  # s_I (ε(∅_T, c_I) − ε(∅_T, ∅_I))

    return predict
