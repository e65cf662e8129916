"""Edit-friendly DDPM inversion: the noise maps that make a DDPM sampler reproduce a given image exactly.

Paper: *An Edit Friendly DDPM Noise Space: Inversion and Manipulations* (Huberman-Spiegelglas, Kulikov &
Michaeli, CVPR 2024), Sec. 2.2 and its inversion algorithm. Reference code: inbarhub/DDPM_inversion
(ddm_inversion/inversion_utils.py) and diffusers' LEDITS++ ``invert`` (docs/methods.md §4).

A DDPM sampler (DDIM with η > 0, *Denoising Diffusion Implicit Models* eq. 12 and 16) draws one noise map z_t
per step:

    x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t                                  ε̂ from CFG: ε_u + w(ε_c − ε_u)
    σ_t = η √((1−ᾱ_p)/(1−ᾱ_t) · (1−ᾱ_t/ᾱ_p))                       p = the next grid t; ᾱ_p = ᾱ_0 past it
    μ_t = √ᾱ_p x̂0 + √(1−ᾱ_p−σ_t²) ε̂
    x_p = μ_t + σ_t z_t

The edit-friendly noise space inverts this for a given x0 in two passes:

1. auxiliary path: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε̃_t with an *independent* ε̃_t ~ N(0, I) for every grid t
   (not one ε for all t, as DDIM-style noising would do);
2. for t = t_0 (largest) → t_{N−1} = 1: z_t = (x_p − μ_t(x_t)) / σ_t, and then the stored x_p is rewritten as
   μ_t + σ_t z_t, the sampler's own arithmetic. Regenerating with the same prompt, guidance, η and z_t
   therefore repeats every operation and returns x0 up to float rounding (no optimisation).

Both passes are the DDIM sampler run by the one sampling loop (``ldm.pipeline.denoise``): ``NoiseMapSampler``
wraps it so that step i takes z_t from the stored maps (regeneration) or solves for it first (extraction),
using the sampler's ``step_mean`` (μ_t, σ_t) and its step with an explicit z.

editlab conventions (docs/methods.md §4.3):
- η²σ² under the root, as DDIM and LEDITS++. inbarhub/DDPM_inversion puts ησ² there; the two agree at η = 1.
  η must be > 0: at η = 0 there is no noise to extract (use DDIM inversion).
- The last map z_1 is kept (the public code zeroes it and breaks the x_1 → x0 step; its author agrees).
- Grid: "leading" with offset 1 (100 steps: t = 991, 981, …, 1), as both references.
- The model output is converted to ε (and x̂0) first, so v-prediction models work too.
- SDXL: every UNet call, while extracting and while editing, also gets the "text_time" conditioning (the
  pooled bigG embedding of the row's prompt and the six size/crop numbers, ldm/sdxl.py), rows matching the
  context; the unconditional rows are SDXL's zeros (no negative prompt, as diffusers' SDXL pipelines). The
  inversion keeps its micro-conditioning so that the edit uses the same numbers.
- CFG runs as one batched UNet call on [uncond; cond] (the reference makes two batch-1 calls; the results
  differ at rounding level). Inversion and regeneration use the same batching, so reconstruction is exact.
  Exactness also needs the same numerics: device, dtype, even the CPU thread count (a tiny random model
  inverted on 2 threads and regenerated on 1 missed x0 by 8e-4).
- The auxiliary noise comes from an explicit ``torch.Generator``, drawn for the smallest t first (t = 1, 11, …),
  the order of diffusers' LEDITS++ ``invert``, so the same seed gives the same maps there.
- Layout: ``latents[i]`` is the input x of step i (at ``timesteps[i]``), ``latents[N]`` = x0, and
  ``noise_maps[i]`` is the z of step i. (The reference stores xts in increasing noise instead.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ldm.hooks import StepHook
from ldm.pipeline import Predictor, denoise, guided_unet, latent_conditioning, noise_schedule_of
from ldm.schedulers import DDIMSampler, NoiseSchedule, gaussian_noise
from ldm.sdxl import MicroConditioning


@dataclass(frozen=True)
class DDPMInversionConfig:
    steps: int = 100  # N inference steps on the leading grid (t = 991 … 1); DDPM_inversion main_run.py
    eta: float = 1.0  # η: σ_t = η·σ_DDPM (η²σ² convention); 1 is DDPM, the paper's setting
    source_guidance: float = 3.5  # CFG scale w under the source prompt while extracting (cfg_src)

    def __post_init__(self):
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 for edit-friendly inversion (got {self.eta}); with eta 0 the "
                             "sampler adds no noise to extract: use DDIM inversion instead")


@dataclass(frozen=True)
class DDPMInversion:
    """The edit-friendly code of one batch of images: regenerate with ``regenerate``."""

    latents: torch.Tensor  # [N+1, B, C, h, w]: latents[i] = x at timesteps[i]; latents[N] = x0
    noise_maps: torch.Tensor  # [N, B, C, h, w]: noise_maps[i] = z_t of step i (t_i -> t_{i+1})
    timesteps: torch.Tensor  # [N] the grid, descending
    eta: float
    prediction_type: str = "epsilon"  # of the model that made it; regeneration converts the same way
    source_prompts: tuple[str, ...] = ()
    source_guidance: float = 1.0
    micro: MicroConditioning | None = None  # SDXL's size/crop numbers (None: the image size, crop (0, 0))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.scaled_linear)  # the model's ᾱ_t

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def row(self, k: int) -> "DDPMInversion":
        """The inversion of batch item k alone (batch 1)."""
        if not 0 <= k < self.latents.shape[1]:
            raise ValueError(f"row {k} out of range for an inversion of batch {self.latents.shape[1]}")
        prompts = self.source_prompts[k:k + 1] if self.source_prompts else ()
        return dataclasses.replace(self, latents=self.latents[:, k:k + 1], noise_maps=self.noise_maps[:, k:k + 1],
                                   source_prompts=prompts)

    def start_latent(self, skip: int) -> torch.Tensor:
        """x at timesteps[skip]: where an edit that skips the first ``skip`` steps starts."""
        check_skip(skip, self.num_steps)
        return self.latents[skip]


def check_skip(skip: int, num_steps: int) -> None:
    if not isinstance(skip, int) or not 0 <= skip < num_steps:
        raise ValueError(f"skip must be an integer in [0, {num_steps - 1}] for {num_steps} steps, got {skip!r}")


def edit_friendly_sampler(num_steps: int, eta: float, prediction_type: str = "epsilon",
                          schedule: NoiseSchedule | None = None) -> DDIMSampler:
    """DDIM(η) on SD's leading grid with offset 1, on the model's ``schedule`` (default: SD's): the sampler
    whose noise maps are extracted."""
    return DDIMSampler(schedule or NoiseSchedule.scaled_linear(), num_steps, eta, prediction_type)


def auxiliary_path(x0: torch.Tensor, sampler: DDIMSampler, generator: torch.Generator | Sequence[torch.Generator]
                   ) -> torch.Tensor:
    """[N+1, B, C, h, w]: x_{t_i} = √ᾱ_{t_i} x0 + √(1−ᾱ_{t_i}) ε̃_i with independent ε̃_i, and x0 last.

    ε̃ is drawn for the smallest t first (as diffusers' LEDITS++). A list of generators draws each batch item
    from its own generator, so item k does not depend on the batch size."""
    path = [x0]
    for i in reversed(range(sampler.num_steps)):
        noise = gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
        path.append(sampler.add_noise(x0, noise, i))  # x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε̃_t
    return torch.stack(path[::-1])  # N+1 × [B, C, h, w] -> [N+1, B, C, h, w], index i = step i


class NoiseMapSampler:
    """DDIM(η) whose step i adds σ_t·z_i with z_i from ``noise_maps`` (regeneration), or, given the target
    ``path`` [N+1, B, ...], first solves x_{i+1} = μ_i + σ_i z_i for z_i and stores it (extraction). Plugs into
    ``ldm.pipeline.denoise``. A map of batch 1 is shared by every row (several prompts, Prompt-to-Prompt)."""

    name = "edit-friendly"

    def __init__(self, sampler: DDIMSampler, noise_maps: torch.Tensor | None = None, path: torch.Tensor | None = None):
        if (noise_maps is None) == (path is None):
            raise ValueError("give the noise maps to regenerate with, or the path to extract them from")
        if noise_maps is not None and noise_maps.shape[0] != sampler.num_steps:
            raise ValueError(f"{noise_maps.shape[0]} noise maps for a {sampler.num_steps}-step sampler")
        if path is not None and path.shape[0] != sampler.num_steps + 1:
            raise ValueError(f"path has {path.shape[0]} latents; a {sampler.num_steps}-step sampler needs "
                             f"{sampler.num_steps + 1} (one per grid step, then x0)")
        self.sampler, self.path = sampler, path
        self.noise_maps = list(noise_maps) if noise_maps is not None else [None] * sampler.num_steps
        self.timesteps = sampler.timesteps

    def __len__(self) -> int:
        return self.sampler.num_steps

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.sampler.scale_model_input(x, i)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.path is not None:
            mean, sigma = self.sampler.step_mean(model_output, i, x)  # μ_t, σ_t
            self.noise_maps[i] = (self.path[i + 1] - mean) / sigma  # z_t = (x_p − μ_t) / σ_t
        return self.sampler.step(model_output, i, x, noise=self.noise_maps[i])  # x_p = μ_t + σ_t z_t


class Trajectory(StepHook):
    """Step hook that keeps every latent of a run: [x at step 0, after step 0, …]."""

    def __init__(self, start: torch.Tensor):
        self.latents = [start]

    def end_step(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        self.latents.append(latents)
        return latents


@torch.no_grad()
def extract_noise_maps(predict: Predictor, sampler: DDIMSampler, path: torch.Tensor, progress: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, noise_maps) from an auxiliary path [N+1, B, ...] (``auxiliary_path``).

    Step i: z_i = (x_{i+1} − μ_i(x_i)) / σ_i, then x_{i+1} ← μ_i + σ_i z_i, so step i+1 starts from exactly
    what the sampler will produce. The caller's ``path`` is not modified."""
    extractor = NoiseMapSampler(sampler, path=path)
    trajectory = Trajectory(path[0])
    denoise(extractor, predict, path[0], None, hooks=[trajectory], progress=progress)
    return torch.stack(trajectory.latents), torch.stack(extractor.noise_maps)  # -> [N+1, B, ...], [N, B, ...]


@torch.no_grad()
def invert(model, x0: torch.Tensor, source_prompts: str | Sequence[str], cfg: DDPMInversionConfig,
           generator: torch.Generator | Sequence[torch.Generator], progress: bool = False,
           micro: MicroConditioning | None = None) -> DDPMInversion:
    """Edit-friendly noise maps of latents ``x0`` [B, C, h, w] (model latents, e.g. ``encode_images`` without a
    generator: the mode, as both references) under the source prompt(s) at ``cfg.source_guidance``.
    ``micro``: SDXL's size/crop conditioning (default: the image size, crop (0, 0))."""
    prompts = [source_prompts] * x0.shape[0] if isinstance(source_prompts, str) else list(source_prompts)
    if len(prompts) != x0.shape[0]:
        raise ValueError(f"{len(prompts)} source prompts for {x0.shape[0]} latents; give one or one per latent")
    sampler = edit_friendly_sampler(cfg.steps, cfg.eta, model.config.prediction_type, noise_schedule_of(model))
    context, added = latent_conditioning(model, prompts, None, cfg.source_guidance, x0, micro)
    x0 = x0.to(model.device, context.dtype)
    predict = guided_unet(model.unet, context, cfg.source_guidance, added=added)
    latents, noise_maps = extract_noise_maps(predict, sampler, auxiliary_path(x0, sampler, generator), progress)
    return DDPMInversion(latents, noise_maps, sampler.timesteps, cfg.eta, sampler.prediction_type, tuple(prompts),
                         cfg.source_guidance, micro, sampler.schedule)


@torch.no_grad()
def sample_native(model, prompts: Sequence[str], latent_shape: tuple[int, int], cfg: DDPMInversionConfig,
                  generator: torch.Generator) -> DDPMInversion:
    """A plain DDPM sampling run that keeps its *native* noise: x_T and every z_t ~ N(0, I), independent.

    Returns the run as a ``DDPMInversion`` (trajectory in ``latents``, the drawn z_t in ``noise_maps``), so
    its noise can be compared with the edit-friendly maps of the image it produced (Sec. 2.2 of the paper).
    """
    prompts = list(prompts)
    sampler = edit_friendly_sampler(cfg.steps, cfg.eta, model.config.prediction_type, noise_schedule_of(model))
    shape = (len(prompts), model.config.vae.latent_channels, *latent_shape)
    context, added = latent_conditioning(model, prompts, None, cfg.source_guidance, torch.empty(shape, device="meta"))
    x_T = gaussian_noise(shape, generator, model.device, context.dtype)
    noise_maps = gaussian_noise((cfg.steps, *shape), generator, model.device, context.dtype)
    predict = guided_unet(model.unet, context, cfg.source_guidance, added=added)
    trajectory = Trajectory(x_T)
    denoise(NoiseMapSampler(sampler, noise_maps), predict, x_T, None, hooks=[trajectory], progress=False)
    return DDPMInversion(torch.stack(trajectory.latents), noise_maps, sampler.timesteps, cfg.eta, sampler.prediction_type,
                         tuple(prompts), cfg.source_guidance, schedule=sampler.schedule)


@torch.no_grad()
def regenerate(predict: Predictor, inversion: DDPMInversion, skip: int = 0, hooks: Sequence = (),
               batch: int | None = None, progress: bool = False) -> torch.Tensor:
    """Run the sampler from step ``skip`` with the stored noise maps; returns the final latents.

    ``predict`` may use another prompt and guidance (an edit). ``batch`` repeats a batch-1 inversion for
    several prompts (the maps are shared)."""
    sampler = edit_friendly_sampler(inversion.num_steps, inversion.eta, inversion.prediction_type, inversion.schedule)
    start = inversion.start_latent(skip)
    if batch is not None and batch != start.shape[0]:
        if start.shape[0] != 1:
            raise ValueError(f"cannot spread an inversion of batch {start.shape[0]} over {batch} rows; invert "
                             "one image to edit it under several prompts")
        start = start.expand(batch, -1, -1, -1)
    return denoise(NoiseMapSampler(sampler, inversion.noise_maps), predict, start, None, start=skip, hooks=hooks,
                   progress=progress)
