"""Manipulations and statistics of the edit-friendly DDPM noise space.

Paper: *An Edit Friendly DDPM Noise Space: Inversion and Manipulations* (Huberman-Spiegelglas, Kulikov &
Michaeli, CVPR 2024). Sec. 2.2 observes that, unlike the native DDPM noise (z_t ~ N(0, I), independent
across t), the edit-friendly maps z_t of an image have a higher variance and are negatively correlated
between consecutive timesteps, and that simple operations on them act on the image:

- image shifting: shift every noise map (and x_T) by d pixels → the regenerated image is shifted by d
  (latent pixels; 8 image pixels each in SD), the uncovered strip is filled in by the model;
- colour manipulation: add a colour direction to the maps inside a mask for a range of steps → that region
  takes the colour, the rest stays.

All functions return new tensors / inversions; the caller's are not modified.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from inversion.ddpm_noise import DDPMInversion
from ldm.pipeline import encode_images
from ldm.schedulers import gaussian_noise


def shift_maps(maps: torch.Tensor, dx: int, dy: int, generator: torch.Generator) -> torch.Tensor:
    """m'(h, w) = m(h − dy, w − dx) where that lies inside, fresh N(0, 1) noise in the uncovered strips.

    :param maps: [..., H, W]; dx > 0 moves content right, dy > 0 down (in latent pixels)."""
    height, width = maps.shape[-2:]
    if abs(dx) >= width or abs(dy) >= height:
        raise ValueError(f"shift ({dx}, {dy}) is larger than the {width}x{height} latent; shift by less")
    shifted = gaussian_noise(maps.shape, generator, maps.device, maps.dtype)
    source = maps[..., max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
    shifted[..., max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)] = source
    return shifted


def shift_noise_maps(inversion: DDPMInversion, dx: int, dy: int, generator: torch.Generator) -> DDPMInversion:
    """Image shifting: shift x_T, every z_t (and, to keep the record aligned, every stored x_t) by (dx, dy).

    Unit-variance noise fills the uncovered strips: right for z_t and, since SD-scaled latents have about unit
    variance, for x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε too (variance ≈ ᾱ_t + 1 − ᾱ_t = 1). Regenerate from skip 0
    with the source prompt: the strips then get the whole trajectory to become image content."""
    return dataclasses.replace(inversion, latents=shift_maps(inversion.latents, dx, dy, generator),
                               noise_maps=shift_maps(inversion.noise_maps, dx, dy, generator))


def colour_noise_maps(inversion: DDPMInversion, mask: torch.Tensor, colour: torch.Tensor, strength: float,
                      first_step: int = 0, last_step: int | None = None) -> DDPMInversion:
    """Colour manipulation: z'_i = z_i + s · m ⊙ c for steps first_step ≤ i < last_step, z'_i = z_i elsewhere.

    Each regenerated step then adds σ_t·s·m⊙c to x, pushing the masked region along the colour direction c.

    :param mask: [H, W] or [h, w] in [0, 1] (image or latent size; resized to the latent by area averaging)
    :param colour: latent direction [C], e.g. ``latent_colour(model, new) − latent_colour(model, old)``
    :param strength: s
    """
    steps, channels, (height, width) = inversion.num_steps, inversion.noise_maps.shape[2], \
        inversion.noise_maps.shape[-2:]
    last_step = steps if last_step is None else last_step
    if not 0 <= first_step < last_step <= steps:
        raise ValueError(f"step range [{first_step}, {last_step}) is empty or outside [0, {steps}]")
    if colour.shape != (channels,):
        raise ValueError(f"colour must be a latent direction of shape ({channels},), got {tuple(colour.shape)}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    mask = mask.to(inversion.noise_maps.device, inversion.noise_maps.dtype)[None, None]  # [H, W] -> [1, 1, H, W]
    if mask.shape[-2:] != (height, width):
        mask = F.adaptive_avg_pool2d(mask, (height, width))
    offset = strength * mask * colour.to(mask).view(1, channels, 1, 1)  # s · m ⊙ c, [1, C, h, w]
    noise_maps = inversion.noise_maps.clone()
    noise_maps[first_step:last_step] = noise_maps[first_step:last_step] + offset
    return dataclasses.replace(inversion, noise_maps=noise_maps)


@torch.no_grad()
def latent_colour(model, rgb: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """The model latent of a flat colour (RGB in [0, 1]): the mean of ``encode_images`` of a uniform image, [C]."""
    image = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)
    return encode_images(model, image).mean(dim=(0, 2, 3)).float().cpu()


def noise_statistics(noise_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance [N], correlation [N−1]) of a sequence of noise maps [N, B, C, h, w], averaged over the batch.

    variance[i] = mean over pixels of (z_i − mean z_i)²; correlation[i] = Pearson correlation between z_i
    and z_{i+1} over all pixels and channels (0 for independent N(0, I) maps)."""
    flat = noise_maps.double().flatten(start_dim=2)  # [N, B, C, h, w] -> [N, B, C·h·w]
    centred = flat - flat.mean(dim=2, keepdim=True)
    variance = centred.pow(2).mean(dim=2)
    covariance = (centred[:-1] * centred[1:]).mean(dim=2)
    correlation = covariance / (variance[:-1] * variance[1:]).sqrt()
    return variance.mean(dim=1), correlation.mean(dim=1)
