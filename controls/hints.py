"""ControlNet hints: turning a detector output or a user image into the conditioning image.

Paper: *Adding Conditional Control to Text-to-Image Diffusion Models* (Zhang, Rao, Agrawala); reference
code lllyasviel/ControlNet ``gradio_canny2image.py`` and ``annotator/util.py`` (docs/methods.md §7.2):

    1. resize the photo so its short side is the resolution and both sides are multiples of 64
       (``resize_for_control``; area averaging when shrinking, Lanczos-4 when enlarging, as cv2.resize);
    2. run the detector at that size (``controls.canny.canny``, white edges on black);
    3. hint = map / 255 ∈ [0, 1], replicated to 3 channels, RGB, [B, 3, H, W] (``to_hint``).

The hint is never normalised to [−1, 1]: the released weights were trained on [0, 1] hints (docs/methods.md
§7.4 item 2; diffusers' control image processor also keeps [0, 1]). Tensors are channel-first ([C, H, W],
[B, C, H, W]); numpy arrays and PIL images are channel-last (H, W, C), as image libraries store them.
Colour images must be RGB: flip OpenCV's BGR with ``image[..., ::-1]`` first.
"""

from __future__ import annotations

import numpy as np
import torch

from .canny import CannyConfig, canny

HINT_CHANNELS = 3  # the hint encoder's first conv takes 3 channels (RGB)
SIZE_MULTIPLE = 64  # annotator/util.py resize_image rounds both sides to multiples of 64
LANCZOS_TAPS = 8  # Lanczos-4: a = 4 source pixels on each side


def as_tensor(image) -> torch.Tensor:
    """A torch tensor as is; a numpy array or PIL image (H, W[, C]) as a channel-first tensor."""
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, np.ndarray) and not hasattr(image, "getbands"):  # getbands: a PIL image
        raise ValueError(f"expected a torch.Tensor, numpy array or PIL image, got {type(image).__name__}")
    tensor = torch.from_numpy(np.array(image))  # a writable, contiguous copy
    return tensor if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # [H, W, C] -> [C, H, W]


def _as_unit_range(image: torch.Tensor) -> torch.Tensor:
    """bool → {0, 1}; uint8 → x / 255; float must already lie in [0, 1]. Returns float32."""
    if image.dtype == torch.bool:
        return image.float()
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        raise ValueError(f"hint images must be bool, uint8 or float, got dtype {image.dtype}")
    low, high = image.min().item(), image.max().item()
    if not 0 <= low <= high <= 1:  # also catches NaN
        raise ValueError(
            f"float hint values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; divide 0…255 images by "
            "255 (ControlNet hints are never normalised to [-1, 1])"
        )
    return image.float()


def control_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The annotator's output size: scale by k = resolution / min(H, W), then round each side to the
    nearest multiple of 64 (round half to even, as numpy): H' = 64·round(k·H / 64), W' = 64·round(k·W / 64)."""
    if resolution <= SIZE_MULTIPLE // 2 or height < 1 or width < 1:
        raise ValueError(
            f"need a resolution > {SIZE_MULTIPLE // 2} (else the short side rounds to 0) and a non-empty "
            f"image, got resolution={resolution} for a {height}x{width} image"
        )
    scale = resolution / min(height, width)
    return (
        round(height * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE,
        round(width * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE,
    )


def area_weights(in_size: int, out_size: int) -> torch.Tensor:
    """Area resampling along one axis: output pixel i covers the source interval [i·s, (i+1)·s),
    s = in/out, and averages the source pixels j by their overlap: W_ij = |[j, j+1) ∩ [i·s, (i+1)·s)| / s.

    :return: [out_size, in_size], rows summing to 1
    """
    scale = in_size / out_size
    starts = torch.arange(out_size, dtype=torch.float64)[:, None] * scale
    pixels = torch.arange(in_size, dtype=torch.float64)[None, :]
    overlap = torch.minimum(starts + scale, pixels + 1) - torch.maximum(starts, pixels)
    return overlap.clamp(min=0) / scale


def lanczos4_weights(in_size: int, out_size: int) -> torch.Tensor:
    """Lanczos-4 interpolation along one axis, with cv2.resize's pixel-centre alignment.

    Output pixel i samples the source at x = (i + ½)·s − ½; the 8 taps j = ⌊x⌋−3 … ⌊x⌋+4 get
    L(j − x), L(d) = sinc(d)·sinc(d / 4), sinc(d) = sin(πd)/(πd), normalised to sum 1; taps outside the
    image fall on the nearest edge pixel (replicated border).

    :return: [out_size, in_size], rows summing to 1
    """
    scale = in_size / out_size
    centres = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5
    taps = torch.floor(centres)[:, None] + torch.arange(-3, LANCZOS_TAPS - 3)  # [out, 8]
    distance = taps - centres[:, None]
    weights = torch.sinc(distance) * torch.sinc(distance / 4)
    weights = weights / weights.sum(dim=1, keepdim=True)
    sources = taps.clamp(0, in_size - 1).long()
    return torch.zeros(out_size, in_size, dtype=torch.float64).scatter_add_(1, sources, weights)


def resample(image: torch.Tensor, height: int, width: int, weights_1d) -> torch.Tensor:
    """Separable resampling out = W_y · image · W_xᵀ with one weight matrix per axis.

    :param image: float [B, C, H, W]
    :param weights_1d: ``area_weights`` or ``lanczos4_weights``
    :return: float [B, C, height, width]
    """
    rows = weights_1d(image.shape[-2], height).to(image)
    columns = weights_1d(image.shape[-1], width).to(image)
    return rows @ image @ columns.T  # [B, C, H, W] -> [B, C, height, width]


def resize_for_control(image, resolution: int = 512) -> torch.Tensor:
    """Resize as lllyasviel/ControlNet's ``resize_image``: size from ``control_size``, area averaging when
    k = resolution / min(H, W) ≤ 1, Lanczos-4 when k > 1 (cv2.INTER_AREA / INTER_LANCZOS4). On uint8
    images the area result equals OpenCV's; OpenCV's Lanczos-4 uses 11-bit fixed-point taps, so there
    a few percent of pixels differ by one level.

    :param image: [C, H, W] or [B, C, H, W] tensor (or an H×W×C array / PIL image); uint8 or float
    :return: the same layout and dtype at the new size, clipped to the input's range ([0, 255] for uint8,
        rounded as OpenCV stores it; [0, 1] for float); Lanczos-4 can overshoot, area averaging cannot
    """
    image = as_tensor(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"resize_for_control expects [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"resize_for_control expects uint8 or float [0, 1] images, got dtype {image.dtype}")
    batch = image if image.ndim == 4 else image[None]  # [C, H, W] -> [1, C, H, W]
    height, width = batch.shape[-2:]
    new_height, new_width = control_size(height, width, resolution)
    enlarging = resolution / min(height, width) > 1
    weights_1d = lanczos4_weights if enlarging else area_weights
    if image.dtype == torch.uint8:
        resized = resample(batch.float(), new_height, new_width, weights_1d)
        halving = (height, width) == (2 * new_height, 2 * new_width)  # cv2's 2× fast path rounds ½ up
        resized = (torch.floor(resized + 0.5) if halving else resized.round()).clamp(0, 255)
    else:
        resized = resample(_as_unit_range(batch), new_height, new_width, weights_1d).clamp(0, 1)
    resized = resized.to(image.dtype)
    return resized if image.ndim == 4 else resized[0]


def to_hint(image, height: int, width: int, multiple: int = 8) -> torch.Tensor:
    """Make a ControlNet hint: float32 [B, 3, height, width] in [0, 1], RGB.

    :param image: an edge map (bool [H, W] or [B, H, W], as ``canny`` returns), or an image: tensor [H, W],
        [C, H, W] or [B, C, H, W] (numpy / PIL: H×W or H×W×C), uint8 [0, 255] or float [0, 1], C ∈ {1, 3};
        one channel is replicated to three
    :param height, width: the generated image's size (multiples of ``multiple``, the model's latent downsampling:
        8 for Stable Diffusion, 4 for the toy model); the image is resampled to it if
        needed (area averaging when shrinking, Lanczos-4 clipped to [0, 1] otherwise). For edge maps
        prefer detecting at the target size (``canny_hint``): resampling blurs one-pixel edges
    """
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"hint size must be positive multiples of {multiple} (the latent is {multiple}x smaller), "
                         f"got {height}x{width}; resize the hint or give --width and --height")
    image = as_tensor(image)
    if image.dtype == torch.bool and image.ndim == 3:
        image = image[:, None]  # edge maps [B, H, W] -> [B, 1, H, W]
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"hint images must be [H, W], [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"got an empty hint image of shape {tuple(image.shape)}")
    batch = image.reshape((1,) * (4 - image.ndim) + tuple(image.shape))  # -> [B, C, H, W]
    channels = batch.shape[1]
    if channels not in (1, HINT_CHANNELS):
        raise ValueError(
            f"hint images need 1 or 3 channels in dim -3, got {channels} (shape {tuple(image.shape)}); "
            "drop an alpha channel, or permute HWC tensors to CHW"
        )
    hint = _as_unit_range(batch).expand(-1, HINT_CHANNELS, -1, -1)  # [B, 1|3, H, W] -> [B, 3, H, W]
    if hint.shape[-2:] != (height, width):
        shrinking = height <= hint.shape[-2] and width <= hint.shape[-1]
        hint = resample(hint, height, width, area_weights if shrinking else lanczos4_weights).clamp(0, 1)
    return hint.contiguous()


def canny_hint(image, resolution: int = 512, config: CannyConfig = CannyConfig()) -> torch.Tensor:
    """The released Canny annotator end to end: resize_for_control → canny → to_hint.

    :param image: RGB [C, H, W] or [B, C, H, W] (numpy / PIL: H×W×C), uint8 or float [0, 1]
    :return: float32 [B, 3, H', W'] in [0, 1], (H', W') = control_size(H, W, resolution)
    """
    resized = resize_for_control(image, resolution)
    edges = canny(resized if resized.ndim == 4 else resized[None], config)  # [B, H', W']
    return to_hint(edges, *edges.shape[-2:])
