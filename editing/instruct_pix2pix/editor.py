"""InstructPix2Pix: edit an image by following a written instruction, with two guidance scales.

Paper: *InstructPix2Pix: Learning to Follow Image Editing Instructions* (Brooks, Holynski, Efros, CVPR 2023).
Code followed: timothybrooks/instruct-pix2pix edit_cli.py (the reference sampler) and diffusers
pipeline_stable_diffusion_instruct_pix2pix.py (the parity peer). docs/methods.md §6.

The model is SD 1.5 whose UNet takes 8 input channels: [noisy latent z_t (4) ‖ image latent c_I (4)], and
cross-attends to the CLIP hidden states c_T of the instruction.

- Image conditioning c_I = E(x).mode(), **unscaled** (no 0.18215): the model was trained that way
  (timothybrooks/instruct-pix2pix#36). ∅_I, the "no image" condition, is an all-zero latent, and ∅_T the
  CLIP hidden states of "".
- Two-way classifier-free guidance (paper eq. 3) over one 3-row batch per input image

      rows:  [(c_T, c_I), (∅_T, c_I), (∅_T, ∅_I)]
      ε̃ = ε(∅_T, ∅_I) + s_I·(ε(∅_T, c_I) − ε(∅_T, ∅_I)) + s_T·(ε(c_T, c_I) − ε(∅_T, c_I))
        = row2 + s_I·(row1 − row2) + s_T·(row0 − row1)

  s_T (text, default 7.5) pulls towards the instruction, s_I (image, default 1.5) towards the input image.
  The guidance is linear, so it is applied to the raw UNet output (ε, or v for v-models) as the references do.
- Sampler: Euler ancestral, 100 steps, on k-diffusion's grid (t = linspace(999, 0, N), σ by log-linear
  interpolation; docs/methods.md §0.2), starting from z = σ_0·N(0, I), as edit_cli.py. Any sampler of the stack can
  be chosen instead (``EditConfig.scheduler`` / ``spacing``).

editlab vs diffusers: both scales are used as given. diffusers switches *all* guidance off (one conditional
row, no image-free row) unless s_T > 1 **and** s_I ≥ 1; editlab always runs the three rows, so s_I < 1 (which
extrapolates away from the input image) and s_T ≤ 1 mean what the formula says. With s_T > 1, s_I ≥ 1 and the
same sampler, seed and image the final latents equal diffusers' (tests/test_ip2p.py).
Random draws follow diffusers: the initial latents randn((B, 4, h, w)) on a CPU generator, then each step's
noise in the sampler; c_I takes no draw (the mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from controls.image_condition import (check_ip2p_model, image_condition, instruction_context,
                                     sdxl_instruction_conditioning, three_way_guidance)
from inversion.visii import hybrid_instruction
from ldm.model import StableDiffusion
from ldm.pipeline import denoise, initial_noise, scheduler_config_of
from ldm.schedulers import resolve_sampler, sampler_from_config, standard_scheduler_config

from .sizing import check_edit_size


@dataclass(frozen=True)
class EditConfig:
    text_guidance: float = 7.5  # s_T, towards the instruction (paper and edit_cli.py default)
    image_guidance: float = 1.5  # s_I, towards the input image (edit_cli.py default; the paper sweeps 1.0-2.2)
    steps: int = 100  # edit_cli.py default
    scheduler: str = "euler-a"  # "euler-a" (reference) or any other sampler of ldm.schedulers
    spacing: str | None = None  # timestep grid; None: "log-linear" for euler-a (k-diffusion), else the model's
    karras: bool | None = None  # Karras σ (σ samplers and solvers); None: the model's config
    eta: float = 0.0  # DDIM stochasticity (ddim only)
    seed: int = 0


def edit_sampler(cfg: EditConfig, prediction_type: str = "epsilon", scheduler_config: dict | None = None):
    """The sampler of ``cfg`` on the model's schedule (``scheduler_config``, SD's standard one by default);
    Euler ancestral defaults to the log-linear grid of edit_cli.py."""
    spacing = cfg.spacing or ("log-linear" if resolve_sampler(cfg.scheduler)[0] == "euler-a" else None)
    return sampler_from_config(cfg.scheduler, scheduler_config or standard_scheduler_config(), cfg.steps,
                               eta=cfg.eta, prediction_type=prediction_type, spacing=spacing, karras=cfg.karras)


@torch.no_grad()
def edit_by_instruction(model: StableDiffusion, images: torch.Tensor, instructions: Sequence[str] | None,
         cfg: EditConfig = EditConfig(), instruction_embedding: torch.Tensor | None = None,
         hooks: Sequence = (), negative: str | None = None, progress: bool = True) -> torch.Tensor:
    """Edit ``images`` [B, 3, H, W] in [0, 1] (sized already: see sizing.py) by one instruction each.
    Returns the final latents [B, 4, H/f, W/f]; ``ldm.pipeline.decode_latents`` turns them into images."""
    check_ip2p_model(model)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    check_edit_size(width, height, model.config)
    batch = images.shape[0]
    sampler = edit_sampler(cfg, model.config.prediction_type, scheduler_config_of(model))
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    added = None
    if model.is_sdxl:
        if instruction_embedding is not None:
            raise ValueError("a learned instruction embedding is not supported on SDXL yet; give an instruction")
        if negative:
            raise ValueError("a negative prompt is not supported for SDXL InstructPix2Pix yet; leave it empty")
        context, added = sdxl_instruction_conditioning(model, instructions, batch, height, width)
    else:
        context = instruction_context(model, instructions, batch, instruction_embedding, negative)
    image_latents = image_condition(model, images).to(context.dtype)
    latents = initial_noise(model, batch, height, width, generator, context.dtype)
    latents = latents * sampler.init_noise_sigma  # z = σ_0·N(0, I) for Euler, N(0, I) for DDIM/DDPM
    predict = three_way_guidance(model.unet, context, image_latents, cfg.text_guidance, cfg.image_guidance, added)
    return denoise(sampler, predict, latents, generator, hooks=hooks, progress=progress)


def apply_instruction(model: StableDiffusion, images: torch.Tensor, instruction: torch.Tensor,
                      cfg: EditConfig = EditConfig(steps=20, text_guidance=8.0), extra_text: str | None = None,
                      eos: int | None = None, progress: bool = True) -> torch.Tensor:
    """Edit ``images`` [B, 3, H, W] with a learned Visii instruction (inversion/visii.py; optionally plus
    ``extra_text``); returns latents. Defaults: the reference's test.py (Euler ancestral, 20 steps, s_T 8, s_I 1.5)."""
    if extra_text:
        if eos is None:
            raise ValueError("a hybrid instruction needs the learned instruction's end position (eos)")
        instruction = hybrid_instruction(model, instruction, eos, extra_text)
    return edit_by_instruction(model, images, None, cfg, instruction_embedding=instruction, progress=progress)


def load_instruction_embedding(path: str | Path) -> torch.Tensor:
    """A learned instruction ([77, C] hidden states, e.g. from Visii) from a safetensors file holding one tensor
    (or a tensor named "instruction_embedding")."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such instruction embedding file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = "instruction_embedding" if "instruction_embedding" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: holds {len(keys)} tensors ({', '.join(keys[:4])}); store one tensor, or "
                                 "name it 'instruction_embedding'")
            return f.get_tensor(key).float()
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for unreadable files
        raise ValueError(f"{path}: not a readable safetensors file ({err.__class__.__name__}); save the embedding "
                         "with safetensors.torch.save_file({'instruction_embedding': tensor}, path)") from None
