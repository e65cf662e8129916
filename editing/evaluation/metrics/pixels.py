"""Pixel metrics, with and without the case's edit mask. Images are [3, H, W] in [0, 1]; masks bool [H, W],
True = edited. "Background" is the complement of the mask: what the edit should leave alone.

    MSE  = mean (a − b)²                    PSNR = 10·log10(1 / MSE)   (data range 1; ∞ when MSE = 0)
    L1   = mean |a − b|                     (MagicBrush's L1; its "L2" is the MSE, not its root)
    SSIM = mean of the SSIM map (Wang et al. 2004; an 11×11 Gaussian window of σ 1.5, C1 = (0.01)²,
           C2 = (0.03)²), one value per pixel: the image is reflect-padded by 5 pixels first (as torchmetrics,
           which PIE-Bench uses), and variances below 0 from rounding are clamped to 0:
           SSIM(x, y) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

Two conventions for the background (docs/evaluation.md):
- clean (default): the mean runs over background pixels only (SSIM: the map's values at those pixels);
- PIE-Bench: both images are multiplied by (1 − mask) and the mean runs over the full frame, so the zeroed
  edit region (equal in both) counts as perfectly preserved; PSNR rises by 10·log10(N_all / N_background).
A case with no background pixel has no background metric (NaN, left out of the means and counted).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_KERNEL, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape[-2:], dtype=like.dtype) if mask is None else mask.to(like.dtype)


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ w·v / Σ w over the last two dims (and channels); NaN when the weights are all 0."""
    total = float(weights.sum()) * (values.numel() // weights.numel())
    return float((values * weights).sum() / total) if total else math.nan


def mse(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Mean squared error over the pixels where ``keep`` is True (all pixels when None)."""
    return masked_mean((a.double() - b.double()) ** 2, _weights(keep, a.double()))


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().mean())


def psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    value = mse(a, b, keep)
    return math.nan if math.isnan(value) else psnr_from_mse(value)


def gaussian_window(size: int = SSIM_KERNEL, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian [size, size]: the outer product of g(d) ∝ exp(−d²/2σ²), d = −(size−1)/2 … ."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d / sigma) ** 2 / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM at every pixel: [3, H, W] images -> [3, H, W] (windows over the reflect-padded images)."""
    window = gaussian_window().to(torch.float64)[None, None].repeat(3, 1, 1, 1)  # [3, 1, k, k], one per channel
    pad = SSIM_KERNEL // 2
    x, y = (F.pad(z.double()[None], (pad, pad, pad, pad), mode="reflect") for z in (a, b))  # [1, 3, H+10, W+10]
    blur = lambda z: F.conv2d(z, window, groups=3)[0]  # back to [3, H, W]
    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp(min=0)
    var_y = (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Mean of the SSIM map over the pixels where ``keep`` is True (all pixels when None)."""
    return masked_mean(ssim_map(a, b), _weights(keep, a.double()))


def background_metrics(output: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None,
                       compat: bool = False) -> dict[str, float]:
    """bg_mse, bg_psnr, bg_ssim of ``output`` against ``source`` outside the edit mask (whole image when the
    case has no mask). ``compat``: PIE-Bench's masked full frame."""
    if mask is None:
        return {"bg_mse": mse(output, source), "bg_psnr": psnr(output, source), "bg_ssim": ssim(output, source)}
    keep = ~mask
    if not keep.any():
        return {"bg_mse": math.nan, "bg_psnr": math.nan, "bg_ssim": math.nan}
    if compat:
        a, b = output * keep, source * keep  # the edit region zeroed in both, then the whole frame
        return {"bg_mse": mse(a, b), "bg_psnr": psnr(a, b), "bg_ssim": ssim(a, b)}
    return {"bg_mse": mse(output, source, keep), "bg_psnr": psnr(output, source, keep),
            "bg_ssim": ssim(output, source, keep)}
