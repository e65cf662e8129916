"""Canny detector and ControlNet hints, checked against OpenCV on real photographs (skimage.data)."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from controls.canny import (
    CannyConfig,
    canny,
    fixed_point_gaussian,
    gaussian_blur,
    gradient_magnitude,
    hysteresis,
    strongest_channel,
)
from controls.hints import canny_hint, control_size, resize_for_control, to_hint

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """uint8 RGB H×W×3 at full size (300×451 to 512×512)."""
    return getattr(data, name)()


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)  # [H, W, C] -> [C, H, W]


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Exact mismatches, and the share of each map's edge pixels within one pixel (3×3) of the other's."""
    square = np.ones((3, 3), np.uint8)
    near_reference = cv2.dilate(reference.astype(np.uint8), square) > 0
    near_ours = cv2.dilate(ours.astype(np.uint8), square) > 0
    return {
        "mismatched": int((ours != reference).sum()),
        "ours_near_reference": (ours & near_reference).sum() / max(ours.sum(), 1),
        "reference_near_ours": (reference & near_ours).sum() / max(reference.sum(), 1),
    }


def assert_matches_opencv(ours: torch.Tensor, reference: np.ndarray):
    assert ours.dtype == torch.bool and ours.shape == reference.shape
    assert reference.sum() > 500  # a real edge map
    stats = agreement(ours.numpy(), reference > 0)
    assert stats["ours_near_reference"] >= 0.95 and stats["reference_near_ours"] >= 0.95, stats
    assert stats["mismatched"] == 0, stats  # measured: pixel-exact on every photograph


@pytest.mark.parametrize("low, high", [(100, 200), (50, 150)])
@pytest.mark.parametrize("name", PHOTOS)
def test_canny_matches_opencv_on_colour_photographs(name, low, high):
    image = photo(name)
    assert_matches_opencv(canny(chw(image), CannyConfig(low, high)), cv2.Canny(image, low, high))


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_canny_grayscale_and_l2_match_opencv(name):
    gray = cv2.cvtColor(photo(name), cv2.COLOR_RGB2GRAY)
    assert_matches_opencv(canny(torch.from_numpy(gray)), cv2.Canny(gray, 100, 200))
    assert_matches_opencv(canny(torch.from_numpy(gray)[None]), cv2.Canny(gray, 100, 200))
    l2 = CannyConfig(100, 200, l2_gradient=True)
    assert_matches_opencv(canny(chw(photo(name)), l2), cv2.Canny(photo(name), 100, 200, L2gradient=True))


@pytest.mark.parametrize("sigma, kernel_size", [(1.0, None), (1.4, 5), (2.0, None)])
def test_blurred_canny_matches_opencv_gaussian_blur_then_canny(sigma, kernel_size):
    image = photo("coffee")
    size = (kernel_size, kernel_size) if kernel_size else (0, 0)  # (0, 0): OpenCV derives k from σ
    blurred = cv2.GaussianBlur(image, size, sigma)
    ours_blurred = gaussian_blur(chw(image)[None].float(), sigma, kernel_size)[0]
    assert torch.equal(ours_blurred, chw(blurred).float())  # bit-exact fixed-point blur
    config = CannyConfig(100, 200, sigma=sigma, kernel_size=kernel_size)
    assert_matches_opencv(canny(chw(image), config), cv2.Canny(blurred, 100, 200))


def test_canny_batched_and_float_input_agree_with_single_uint8():
    crops = torch.stack([chw(photo(name))[:, :128, :128] for name in PHOTOS])  # [4, 3, 128, 128]
    batched = canny(crops)
    assert batched.shape == (4, 128, 128)
    for crop, edges in zip(crops, batched):
        assert torch.equal(edges, canny(crop))
        assert torch.equal(edges, torch.from_numpy(cv2.Canny(crop.permute(1, 2, 0).numpy().copy(), 100, 200) > 0))
    assert torch.equal(canny(crops.double() / 255), batched)  # float [0, 1] is quantised to the same levels


def test_step_edge_tie_breaking_and_strongest_channel():
    # A vertical step: columns c-1 and c get the same |g_x| = 4·255; OpenCV keeps m > m(left) and
    # m >= m(right), so the line sits on column c-1 only.
    step = torch.zeros(3, 16, 16, dtype=torch.uint8)
    step[1, :, 9:] = 255  # only the green channel has the edge
    edges = canny(step)
    assert edges[:, 8].all() and edges.sum() == 16
    assert torch.equal(edges, torch.from_numpy(cv2.Canny(step.permute(1, 2, 0).numpy().copy(), 100, 200) > 0))
    # Ties between channels keep the first channel's gradient.
    grad_x = torch.tensor([3, -3]).view(1, 2, 1, 1)
    grad_y = torch.tensor([-1, 1]).view(1, 2, 1, 1)
    picked_x, picked_y, magnitude = strongest_channel(grad_x, grad_y, gradient_magnitude(grad_x, grad_y))
    assert (picked_x.item(), picked_y.item(), magnitude.item()) == (3, -1, 4)
    assert gradient_magnitude(grad_x, grad_y, l2=True).flatten().tolist() == [10, 10]


def test_hysteresis_keeps_weak_pixels_8_connected_to_strong_ones():
    weak = torch.zeros(1, 6, 8, dtype=torch.bool)
    weak[0, 1, 0:4] = True  # a run touching the strong pixel
    weak[0, 2, 4] = True  # diagonal neighbour of the run's end: 8-connected
    weak[0, 4, 6:8] = True  # an isolated weak run
    strong = torch.zeros_like(weak)
    strong[0, 1, 0] = True
    edges = hysteresis(strong, weak)
    expected = weak.clone()
    expected[0, 4] = False
    assert torch.equal(edges, expected)


def test_canny_rejects_bad_input():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="low <= high"):
        CannyConfig(200, 100)
    with pytest.raises(ValueError, match="odd"):
        CannyConfig(sigma=1.0, kernel_size=4)
    with pytest.raises(ValueError, match="sigma > 0"):
        CannyConfig(kernel_size=5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        canny(image.float() * 2 - 1)
    with pytest.raises(ValueError, match="dtype"):
        canny(image.int())
    with pytest.raises(ValueError, match="channels"):
        canny(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too large"):
        canny(image, CannyConfig(sigma=3.0))
    assert sum(fixed_point_gaussian(2.0, 13)) == 256


def test_control_size_rule():
    # k = 512 / 400 = 1.28: 400·k = 512, 600·k = 768 (12 × 64).
    assert control_size(400, 600, 512) == (512, 768)
    # 451·512/300 = 769.7 -> 12.03 × 64 -> 768; short side exactly 512.
    assert control_size(300, 451, 512) == (512, 768)
    # 544/64 = 8.5 rounds half to even (numpy's rule) -> 8 × 64.
    assert control_size(512, 544, 512) == (512, 512)
    assert control_size(544, 512, 512) == (512, 512)
    for height, width in [(123, 457), (1000, 667), (77, 77), (512, 2048)]:
        scale = 384 / min(height, width)
        new_height, new_width = control_size(height, width, 384)
        assert new_height % 64 == 0 and new_width % 64 == 0
        assert abs(new_height - scale * height) <= 32 and abs(new_width - scale * width) <= 32
    with pytest.raises(ValueError, match="resolution"):
        control_size(100, 100, 32)


@pytest.mark.parametrize("name, resolution", [("astronaut", 256), ("coffee", 384), ("rocket", 256), ("chelsea", 512)])
def test_resize_for_control_matches_opencv(name, resolution):
    image = photo(name)
    height, width = control_size(*image.shape[:2], resolution)
    enlarging = resolution > min(image.shape[:2])
    reference = cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)
    ours = resize_for_control(chw(image), resolution)
    assert ours.dtype == torch.uint8 and ours.shape == (3, height, width)
    difference = (ours.int() - chw(reference).int()).abs()
    if enlarging:  # OpenCV's fixed-point Lanczos taps: at most one level, on a few pixels
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.06
    else:
        assert difference.max() == 0
    assert torch.equal(resize_for_control(image, resolution), ours)  # H×W×C numpy input
    as_float = resize_for_control(chw(image)[None].float() / 255, resolution)
    assert as_float.shape == (1, 3, height, width) and 0 <= as_float.min() and as_float.max() <= 1


def test_canny_hint_is_the_released_annotator_pipeline():
    image = photo("chelsea")  # 300 × 451
    hint = canny_hint(chw(image), resolution=128)  # shrinking: area averaging, OpenCV-exact
    height, width = control_size(*image.shape[:2], 128)
    detected = cv2.Canny(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), 100, 200)
    expected = torch.from_numpy(np.stack([detected] * 3) / 255.0).float()[None]
    assert hint.shape == (1, 3, height, width) and hint.dtype == torch.float32
    assert torch.equal(hint, expected)


def test_to_hint_ranges_channels_and_errors():
    edges = canny(chw(photo("rocket")))[:96, :128]
    hint = to_hint(edges, 96, 128)
    assert hint.shape == (1, 3, 96, 128) and hint.dtype == torch.float32
    assert set(hint.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hint[0, 0], edges.float()) and torch.equal(hint[0, 1], hint[0, 2])
    assert to_hint(torch.stack([edges, ~edges]), 96, 128).shape == (2, 3, 96, 128)

    rgb = chw(photo("coffee"))[:, :64, :96]
    assert torch.allclose(to_hint(rgb, 64, 96)[0], rgb.float() / 255)
    assert torch.equal(to_hint(rgb.permute(1, 2, 0).numpy(), 64, 96), to_hint(rgb, 64, 96))
    for height, width in [(32, 48), (128, 200)]:  # shrink (area) and enlarge (Lanczos, clipped)
        resized = to_hint(edges, height, width)
        assert resized.shape == (1, 3, height, width)
        assert 0 <= resized.min() and resized.max() <= 1 and resized.max() > 0.5

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_hint(rgb.float() / 127.5 - 1, 64, 96)  # a [-1, 1] image is refused, never passed on
    with pytest.raises(ValueError, match="channels"):
        to_hint(torch.zeros(4, 64, 64), 64, 64)
    with pytest.raises(ValueError, match="dtype"):
        to_hint(rgb.int(), 64, 96)
    with pytest.raises(ValueError, match="multiples of 8"):
        to_hint(rgb, 60, 96)
    assert to_hint(rgb, 60, 96, multiple=4).shape == (1, 3, 60, 96)  # the toy model's latent is 4x smaller
    with pytest.raises(ValueError, match=r"multiples of 4 \(the latent is 4x smaller\), got 30x96"):
        to_hint(rgb, 30, 96, multiple=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_canny_on_cuda_matches_cpu():
    image = chw(photo("astronaut"))
    config = CannyConfig(100, 200, sigma=1.0)
    assert torch.equal(canny(image.cuda(), config).cpu(), canny(image, config))
