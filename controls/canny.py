"""Canny edge detection in torch ops: the condition detector of the Canny ControlNet.

Paper: J. Canny, *A Computational Approach to Edge Detection* (1986). Reference behaviour: OpenCV's
``cv2.Canny(image, 100, 200)`` on the uint8 RGB image, which is what lllyasviel/ControlNet's
``annotator/canny`` calls (no blur, 3×3 Sobel, L1 gradient norm). Stages, one function each:

    1. optional Gaussian blur      I ← G_σ * I                        (off by default, as in the annotator)
    2. Sobel gradients             g_x = S_x * I,  g_y = S_y * I       (3×3, replicated border)
    3. gradient magnitude          m = |g_x| + |g_y|   (L2: g_x² + g_y², squared as OpenCV does)
    4. strongest channel           colour images keep, per pixel, the channel with the largest m
    5. non-maximum suppression     m must beat both neighbours across the edge (4 direction sectors)
    6. double threshold            weak: m > low,  strong: m > high
    7. hysteresis                  edges = weak pixels 8-connected to a strong pixel

Everything after the blur is integer arithmetic, so on uint8 images the result matches OpenCV pixel for
pixel, including OpenCV's tie-breaking (> on one side, >= on the other). Works batched, on CPU and CUDA.
Images are [H, W], [C, H, W] or [B, C, H, W] with C ∈ {1, 3}; uint8 in [0, 255] or float in [0, 1]
(floats are quantised to the 256 uint8 levels, because the thresholds live on the uint8 Sobel scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CANNY_SHIFT = 15  # OpenCV's fixed-point shift for the direction test
TAN_22_5 = round(math.tan(math.radians(22.5)) * 2**CANNY_SHIFT)  # 13573 = tan(22.5°)·2^15, OpenCV's TG22


@dataclass(frozen=True)
class CannyConfig:
    low_threshold: float = 100.0  # weak edges: m > low (annotator/canny default, gradio slider 100)
    high_threshold: float = 200.0  # strong edges: m > high (annotator/canny default, gradio slider 200)
    sigma: float = 0.0  # Gaussian pre-blur σ in pixels; 0 = no blur (the annotator does not blur)
    kernel_size: int | None = None  # blur kernel side; None = OpenCV's uint8 rule round(6σ + 1) | 1
    l2_gradient: bool = False  # False: OpenCV's default m = |gx| + |gy|; True: m = √(gx² + gy²)

    def __post_init__(self):
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise ValueError(
                f"Canny thresholds need 0 <= low <= high, got low={self.low_threshold}, "
                f"high={self.high_threshold}; pass them in that order"
            )
        if self.sigma < 0:
            raise ValueError(f"Canny blur sigma must be >= 0 (0 = no blur), got {self.sigma}")
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"Canny blur kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.kernel_size is not None and self.sigma == 0:
            raise ValueError(f"Canny blur kernel_size={self.kernel_size} needs sigma > 0 (sigma=0 means no blur)")


def as_uint8_levels(image: torch.Tensor) -> torch.Tensor:
    """Check an image and bring it to [B, C, H, W] float32 holding the integers 0…255.

    :param image: [H, W], [C, H, W] or [B, C, H, W], C ∈ {1, 3}; uint8 in [0, 255] or float in [0, 1]
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"canny expects a torch.Tensor, got {type(image).__name__}; use torch.from_numpy")
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"canny expects [H, W], [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"canny got an empty image of shape {tuple(image.shape)}")
    batch = image.reshape((1,) * (4 - image.ndim) + tuple(image.shape))  # -> [B, C, H, W]
    if batch.shape[1] not in (1, 3):
        raise ValueError(
            f"canny expects 1 (gray) or 3 (RGB) channels in dim -3, got {batch.shape[1]} "
            f"(shape {tuple(image.shape)}); drop an alpha channel, or permute HWC to CHW"
        )
    if batch.dtype == torch.uint8:
        return batch.float()
    if not batch.is_floating_point():
        raise ValueError(f"canny expects uint8 [0, 255] or float [0, 1] images, got dtype {batch.dtype}")
    low, high = batch.min().item(), batch.max().item()
    if not 0 <= low <= high <= 1:  # also catches NaN
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "divide 0…255 images by 255, or map [-1, 1] images with (x + 1) / 2"
        )
    return torch.round(batch.float() * 255)


def gaussian_kernel_size(sigma: float) -> int:
    """OpenCV's kernel side for uint8 images when none is given: k = round(2·3σ + 1) | 1 (always odd)."""
    return round(sigma * 3 * 2 + 1) | 1


def fixed_point_gaussian(sigma: float, size: int) -> list[int]:
    """Gaussian taps in units of 1/256, as OpenCV's bit-exact uint8 GaussianBlur uses them.

    G_i = exp(−x_i² / 2σ²) / Σ_j exp(−x_j² / 2σ²) for x_i = i − (k−1)/2. The outer taps are rounded
    to multiples of 1/256 from the edge inwards, each carrying the previous rounding error along
    (error diffusion, round half to even); the centre tap takes whatever makes the sum exactly 256.
    """
    radius = size // 2
    weights = [math.exp(-((i - radius) ** 2) / (2 * sigma**2)) for i in range(size)]
    total = sum(weights)
    taps, error = [0] * size, 0.0
    for i in range(radius):
        wanted = weights[i] / total * 256 + error
        taps[i] = taps[size - 1 - i] = round(wanted)
        error = wanted - taps[i]
    taps[radius] = 256 - 2 * sum(taps[:radius])
    return taps


def correlate_1d(padded: torch.Tensor, taps: list[int], dim: int) -> torch.Tensor:
    """Valid 1-D cross-correlation along ``dim``: out_j = Σ_i taps_i · x_{j+i}.

    Written as shifted sums rather than conv2d: all values are integers below 2^24, which float32
    holds exactly, whereas a TF32 convolution on a GPU would round them.
    """
    length = padded.shape[dim] - len(taps) + 1
    return sum(tap * padded.narrow(dim, i, length) for i, tap in enumerate(taps) if tap != 0)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur that reproduces ``cv2.GaussianBlur(img, (k, k), σ)`` on uint8 images.

        B = ⌊(Σ_ij g_i g_j I_{y+i, x+j} + 2^15) / 2^16⌋     (g = fixed_point_gaussian, in 1/256 units)

    i.e. rows then columns in exact integer arithmetic, rounded once to the nearest level. The border
    is reflected without repeating the edge pixel (OpenCV's BORDER_REFLECT_101, torch's "reflect").

    :param image: [B, C, H, W] float holding integer levels 0…255
    """
    size = gaussian_kernel_size(sigma) if kernel_size is None else kernel_size
    taps, radius = fixed_point_gaussian(sigma, size), size // 2
    if radius >= min(image.shape[-2:]):
        raise ValueError(f"blur kernel {size}x{size} is too large for a {tuple(image.shape[-2:])} image; lower sigma")
    rows = correlate_1d(F.pad(image, (radius, radius, 0, 0), mode="reflect"), taps, dim=-1)
    both = correlate_1d(F.pad(rows, (0, 0, radius, radius), mode="reflect"), taps, dim=-2)
    return torch.floor((both + 2**15) / 2**16)


def sobel_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3×3 Sobel derivatives per channel, as OpenCV's Canny computes them (CV_16S, BORDER_REPLICATE).

        S_x = [1, 2, 1]ᵀ [−1, 0, 1] = [[−1, 0, 1], [−2, 0, 2], [−1, 0, 1]],   S_y = S_xᵀ
    applied by cross-correlation: g_x > 0 where the image gets brighter to the right, g_y > 0 where it
    gets brighter downwards.

    :param image: [B, C, H, W] float holding integer levels
    :return: g_x, g_y as int32 [B, C, H, W], |g| ≤ 4·255
    """
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    grad_x = correlate_1d(correlate_1d(padded, [-1, 0, 1], dim=-1), [1, 2, 1], dim=-2)
    grad_y = correlate_1d(correlate_1d(padded, [1, 2, 1], dim=-1), [-1, 0, 1], dim=-2)
    return grad_x.to(torch.int32), grad_y.to(torch.int32)


def gradient_magnitude(grad_x: torch.Tensor, grad_y: torch.Tensor, l2: bool = False) -> torch.Tensor:
    """L1: m = |g_x| + |g_y| (OpenCV's default); L2: m = g_x² + g_y², kept squared so it stays an integer
    (the thresholds are squared to match, as OpenCV does)."""
    if l2:
        return grad_x * grad_x + grad_y * grad_y
    return grad_x.abs() + grad_y.abs()


def strongest_channel(
    grad_x: torch.Tensor, grad_y: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For colour images OpenCV keeps, per pixel, the channel c* = argmax_c m_c (the first one on ties)
    and uses its g_x, g_y and m; a one-channel image passes through.

    :return: g_x, g_y, m, each [B, C, H, W] -> [B, H, W]
    """
    best = magnitude.argmax(dim=1, keepdim=True)  # [B, 1, H, W]; torch returns the first maximum
    return tuple(t.gather(1, best)[:, 0] for t in (grad_x, grad_y, magnitude))


def non_maximum_suppression(grad_x: torch.Tensor, grad_y: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Keep pixels whose magnitude is a maximum across the edge, along the quantised gradient direction.

    With t = |g_y|·2^15 and TG22 = round(tan 22.5°·2^15) (OpenCV's fixed point, exact in integers):
        horizontal gradient  t < |g_x|·TG22              keep if m > m(left)     and m >= m(right)
        vertical gradient    t > |g_x|·(TG22 + 2^16)      keep if m > m(up)       and m >= m(down)
          (tan 67.5° = tan 22.5° + 2)
        diagonal otherwise, g_x, g_y of equal sign       keep if m > m(up-left)  and m > m(down-right)
                            of opposite sign             keep if m > m(up-right) and m > m(down-left)
    Pixels outside the image have magnitude 0, as in OpenCV's padded buffers.

    :param grad_x, grad_y, magnitude: int [B, H, W]
    :return: bool [B, H, W]
    """
    height, width = magnitude.shape[-2:]
    padded = F.pad(magnitude, (1, 1, 1, 1))  # [B, H, W] -> [B, H+2, W+2], zeros outside

    def neighbour(down: int, right: int) -> torch.Tensor:
        return padded[:, 1 + down : 1 + down + height, 1 + right : 1 + right + width]

    abs_x = grad_x.abs().long()
    scaled_y = grad_y.abs().long() << CANNY_SHIFT
    horizontal = scaled_y < abs_x * TAN_22_5
    vertical = scaled_y > abs_x * (TAN_22_5 + (2 << CANNY_SHIFT))
    diagonal = ~(horizontal | vertical)
    same_sign = (grad_x < 0) == (grad_y < 0)

    m = magnitude
    keep_horizontal = (m > neighbour(0, -1)) & (m >= neighbour(0, 1))
    keep_vertical = (m > neighbour(-1, 0)) & (m >= neighbour(1, 0))
    keep_falling = (m > neighbour(-1, -1)) & (m > neighbour(1, 1))  # "\" direction, equal signs
    keep_rising = (m > neighbour(-1, 1)) & (m > neighbour(1, -1))  # "/" direction, opposite signs
    return (
        (horizontal & keep_horizontal)
        | (vertical & keep_vertical)
        | (diagonal & same_sign & keep_falling)
        | (diagonal & ~same_sign & keep_rising)
    )


def double_threshold(
    magnitude: torch.Tensor, is_maximum: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """weak = maximum ∧ m > low,  strong = maximum ∧ m > high (both strict, as OpenCV)."""
    weak = is_maximum & (magnitude > low)
    return weak, weak & (magnitude > high)


def dilate_3x3(mask: torch.Tensor) -> torch.Tensor:
    """Binary dilation with a 3×3 square: D(x, y) = max over |dx|, |dy| ≤ 1 of M(x + dx, y + dy)."""
    padded = F.pad(mask, (1, 1, 1, 1))  # [B, H, W] -> [B, H+2, W+2], False outside
    rows = padded[..., :-2] | padded[..., 1:-1] | padded[..., 2:]
    return rows[..., :-2, :] | rows[..., 1:-1, :] | rows[..., 2:, :]


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Edges = weak pixels 8-connected (through weak pixels) to a strong pixel.

    Grow E_0 = strong by E_{k+1} = weak ∧ dilate_3×3(E_k) until E_{k+1} = E_k; this is OpenCV's
    stack-based edge tracing done in parallel (tens of steps on photographs).

    :param strong, weak: bool [B, H, W], strong ⊆ weak
    """
    edges = strong
    while True:
        grown = weak & dilate_3x3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny(image: torch.Tensor, config: CannyConfig = CannyConfig()) -> torch.Tensor:
    """Canny edges of an image; the same map as ``cv2.Canny(image, low, high)`` on uint8 input.

    :param image: [H, W], [C, H, W] or [B, C, H, W], C ∈ {1, 3} (RGB); uint8 [0, 255] or float [0, 1]
    :return: bool edge map [H, W] (unbatched input) or [B, H, W]
    """
    levels = as_uint8_levels(image)
    if config.sigma > 0:
        levels = gaussian_blur(levels, config.sigma, config.kernel_size)
    grad_x, grad_y = sobel_gradients(levels)
    magnitude = gradient_magnitude(grad_x, grad_y, l2=config.l2_gradient)
    grad_x, grad_y, magnitude = strongest_channel(grad_x, grad_y, magnitude)
    low, high = config.low_threshold, config.high_threshold
    if config.l2_gradient:
        low, high = low * low, high * high  # the magnitude is squared
    weak, strong = double_threshold(magnitude, non_maximum_suppression(grad_x, grad_y, magnitude), low, high)
    edges = hysteresis(strong, weak)
    return edges if image.ndim == 4 else edges[0]
