"""Attribute readers for toy-world images: which background, which object colour, which shape, where.

No learning, only colour distances and mask geometry, so that they also work on the slightly blurry,
noisy, colour-shifted images a small diffusion model produces:

- background colour b = per-channel median of the border pixels, named by the nearest palette colour;
- object mask: d(p) = ‖image(p) − b‖₂, kept where d(p) > d_obj/2, with d_obj the 99th percentile of d
  (inside the object, which covers more than 1% of the image). Along an anti-aliased edge
  image = b + c·(colour − b), so d = c·d_obj and the cut at d_obj/2 is the cut at coverage c = 1/2, the
  rule that defines the rendered mask. Then the largest 4-connected component is kept and its holes filled;
- object colour = nearest palette colour to the per-channel median of the (eroded) mask pixels;
- shape = the template (shapes.inside) with the largest IoU(A, B) = |A ∩ B| / |A ∪ B| with the mask, each
  template placed on the mask by matching centroid and per-axis standard deviation.

Images are numpy [H, W, 3] (uint8, or float in [0, 1]) or torch [3, H, W] (float in [−1, 1] as the model
uses them, or uint8). Readers return None when no object is found.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .shapes import COLOURS, SHAPES, inside

MIN_CONTRAST = 0.25  # smallest object–background colour distance (RGB in [0, 1]); palette pairs are >= 0.46
MIN_AREA = 0.01  # smallest object, as a fraction of the image (41 px at 64×64; the smallest rendered is 162)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64) / 255  # [K, 3]


def to_rgb(image) -> np.ndarray:
    """Any accepted image layout -> float64 numpy [H, W, 3] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"torch images must be [3, H, W], got {tuple(image.shape)}")
        array = image.detach().cpu().permute(1, 2, 0).double().numpy()  # [3, H, W] -> [H, W, 3]
        rgb = array / 255 if image.dtype == torch.uint8 else (array + 1) / 2
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be [H, W, 3], got {image.shape}")
        rgb = image / 255 if image.dtype == np.uint8 else image.astype(np.float64)
    else:
        raise ValueError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    return np.clip(rgb, 0, 1)


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour closest (Euclidean, RGB in [0, 1]) to one colour of shape [3]."""
    return list(COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _border_rgb(rgb: np.ndarray) -> np.ndarray:
    width = max(1, rgb.shape[0] // 32)  # 2 px at 64×64
    frame = np.ones(rgb.shape[:2], dtype=bool)
    frame[width:-width, width:-width] = False
    return np.median(rgb[frame], axis=0)


def read_background(image) -> str:
    """Background colour name, from the median of the border pixels."""
    return nearest_colour(_border_rgb(to_rgb(image)))


def _neighbours(values: np.ndarray, fill) -> list[np.ndarray]:
    """The 4-neighbours of every pixel (up, down, left, right), `fill` outside the image."""
    padded = np.pad(values, 1, constant_values=fill)
    return [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component: every pixel repeatedly takes the smallest label among itself and its
    in-mask neighbours until nothing changes; then each component carries one label."""
    none = mask.size + 1
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        updated = np.where(mask, np.minimum.reduce([labels] + _neighbours(labels, none)), none)
        if np.array_equal(updated, labels):
            break
        labels = updated
    if not mask.any():
        return mask.copy()
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Add every non-mask pixel that cannot reach the image border through non-mask pixels."""
    outside = np.zeros_like(mask)
    outside[[0, -1], :], outside[:, [0, -1]] = ~mask[[0, -1], :], ~mask[:, [0, -1]]
    while True:
        grown = (outside | np.logical_or.reduce(_neighbours(outside, False))) & ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def object_mask(image) -> np.ndarray:
    """bool [H, W]: the object's pixels (all False when there is none)."""
    rgb = to_rgb(image)
    background = _border_rgb(rgb)
    distance = np.linalg.norm(rgb - background, axis=2)  # d(p) = ‖image(p) − b‖
    object_distance = np.percentile(distance, 99)  # d_obj: the top 1% of pixels lie inside any real object
    nothing = np.zeros(distance.shape, dtype=bool)
    if object_distance < MIN_CONTRAST:
        return nothing
    mask = largest_component(distance > object_distance / 2)  # the cut at coverage 1/2
    if mask.sum() < MIN_AREA * mask.size:
        return nothing
    # An object has one colour; a blob of pixel noise has the background's colour on average.
    if np.linalg.norm(np.median(rgb[mask], axis=0) - background) < MIN_CONTRAST:
        return nothing
    return fill_holes(mask)


def _as_bool(mask) -> np.ndarray:
    return np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)


def _mask_for(image, mask) -> np.ndarray:
    if mask is None:
        return object_mask(image)
    mask = _as_bool(mask)
    height, width = to_rgb(image).shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match the image's ({height}, {width})")
    return mask


def read_colour(image, mask=None) -> str | None:
    """Object colour name: nearest palette colour to the per-channel median of the mask pixels, eroded by one
    pixel (dropping the blended edge) when enough remain. None when the mask is empty."""
    rgb, mask = to_rgb(image), _mask_for(image, mask)
    core = mask & np.logical_and.reduce(_neighbours(mask, False))  # 4-neighbour erosion
    pixels = rgb[core] if core.sum() >= 10 else rgb[mask]
    return nearest_colour(np.median(pixels, axis=0)) if len(pixels) else None


@functools.lru_cache(maxsize=None)
def _template_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid (μ_u, μ_v) and standard deviations (σ_u, σ_v) of a shape in its [−1, 1]² frame."""
    grid = (np.arange(512) + 0.5) / 256 - 1
    u, v = np.meshgrid(grid, grid)
    hit = inside(shape, u, v)
    return u[hit].mean(), v[hit].mean(), u[hit].std(), v[hit].std()


def shape_scores(mask: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """IoU of the mask with each shape's template, placed by matching moments: the template's centroid goes
    to the mask's centroid (m_x, m_y) and each axis is scaled so that the standard deviations agree,
    u = μ_u + (x − m_x)·σ_u/s_x (same for v). Moments, unlike the bounding box, barely move when blur rounds
    off a corner. All scores are 0 for an empty mask."""
    mask = _as_bool(mask)
    if not mask.any():
        return {shape: 0.0 for shape in shapes}
    y, x = np.nonzero(mask)
    x, y = x + 0.5, y + 0.5  # pixel centres
    mean_x, mean_y, std_x, std_y = x.mean(), y.mean(), max(x.std(), 0.5), max(y.std(), 0.5)
    pixel_y, pixel_x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
    scores = {}
    for shape in shapes:
        mean_u, mean_v, std_u, std_v = _template_moments(shape)
        u = mean_u + (pixel_x - mean_x) * std_u / std_x
        v = mean_v + (pixel_y - mean_y) * std_v / std_y
        scores[shape] = mask_iou(inside(shape, u, v), mask)
    return scores


def read_shape(image, mask=None, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """Shape name whose template best matches the mask (max IoU); None when the mask is empty."""
    mask = _mask_for(image, mask)
    if not mask.any():
        return None
    scores = shape_scores(mask, shapes)
    return max(scores, key=scores.get)


def read_attributes(image) -> dict:
    """{shape, colour, background, mask, center}; center = (x, y) of the mask's centroid as fractions of the
    image side. shape, colour and center are None when no object is found."""
    mask = object_mask(image)
    rows, cols = np.nonzero(mask)
    center = (float((cols.mean() + 0.5) / mask.shape[1]), float((rows.mean() + 0.5) / mask.shape[0])) \
        if mask.any() else None
    return {"shape": read_shape(image, mask), "colour": read_colour(image, mask),
            "background": read_background(image), "mask": mask, "center": center}


def mask_iou(first, second) -> float:
    """IoU = |A ∩ B| / |A ∪ B| of two bool masks (numpy or torch) of one shape; 1.0 when both are empty."""
    first, second = _as_bool(first), _as_bool(second)
    if first.shape != second.shape:
        raise ValueError(f"masks differ in shape: {first.shape} vs {second.shape}")
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 1.0
