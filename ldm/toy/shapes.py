"""The procedural "toy world": one flat shape on a named background, with its caption.

A tiny latent diffusion model is trained on these images so that editing methods can be tested on meaning,
not only on numbers: "a red circle on a blue background" must come out red and round, and a Prompt-to-Prompt
swap "circle" -> "square" must keep the object in place (readers.py measures both).

Geometry is resolution free. A `ShapeSpec` gives the object's width `size` and its bounding-box `center`
as fractions of the image side; `render` draws it at any resolution with anti-aliased edges by
supersampling (draw an s×s finer grid, then average each s×s block):

    coverage(p) = (1/s²) Σ_k 1[sub-pixel k of p is inside the shape]
    image(p)    = (1 − coverage(p))·background(p) + coverage(p)·colour          (alpha compositing)
    mask(p)     = coverage(p) ≥ 1/2

Every shape is upright and fills a square bounding box of side `size`, so readers.py can classify a mask by
matching it against these same templates.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..seeding import derived_seed

# Palette: saturated sRGB colours at least 118 apart (blue–purple) in 0–255 RGB, so a nearest-colour reader
# survives blur, noise and a mild colour shift. "orange" was left out: it is only 76 from yellow.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 190),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "noise")  # background textures; not named in the caption
CROSS_ARM = 1 / 3  # width of each arm of the cross, as a fraction of the cross's width


@dataclass(frozen=True)
class ToyConfig:
    """What `sample_spec` draws from. Names must come from COLOURS, SHAPES and TEXTURES."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)  # object and background colours (never the same in one image)
    textures: tuple[str, ...] = TEXTURES  # drawn uniformly
    min_size: float = 0.34  # object width / image width: 22 px at 64×64 ...
    max_size: float = 0.50  # ... up to 32 px
    margin: float = 0.03  # gap between the object's bounding box and the image edge (2 px at 64×64)

    def __post_init__(self):
        _check_names("shape", self.shapes, SHAPES)
        _check_names("colour", self.colours, tuple(COLOURS))
        _check_names("texture", self.textures, TEXTURES)
        if len(self.colours) < 2:
            raise ValueError(f"need at least 2 colours (object and background differ), got {self.colours}")
        if not 0 < self.min_size <= self.max_size <= 1 - 2 * self.margin:
            raise ValueError(f"need 0 < min_size <= max_size <= 1 - 2*margin, got {self.min_size}, "
                             f"{self.max_size}, margin {self.margin}")


@dataclass(frozen=True)
class ShapeSpec:
    """One toy image. `size` and `center` = (x, y) are fractions of the image side; (0, 0) is the top-left
    corner, `center` is the centre of the object's bounding box. `texture_seed` fixes the background texture."""

    shape: str
    colour: str
    background: str
    texture: str = "plain"
    size: float = 0.35
    center: tuple[float, float] = (0.5, 0.5)
    texture_seed: int = 0

    def __post_init__(self):
        _check_names("shape", (self.shape,), SHAPES)
        _check_names("colour", (self.colour, self.background), tuple(COLOURS))
        _check_names("texture", (self.texture,), TEXTURES)
        if self.colour == self.background:
            raise ValueError(f"object colour equals background colour ({self.colour}): the object would be "
                             "invisible; pick two different colours")
        if not 0 < self.size <= 1:
            raise ValueError(f"size is a fraction of the image width in (0, 1], got {self.size}")
        object.__setattr__(self, "size", float(self.size))
        center = tuple(float(c) for c in self.center)
        if len(center) != 2 or not all(math.isfinite(c) for c in center):
            raise ValueError(f"center must be two finite numbers (x, y), got {self.center}")
        object.__setattr__(self, "center", center)


def _check_names(kind: str, names, allowed: tuple[str, ...]) -> None:
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {kind} {bad or names!r}; choose from {allowed}")


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points lie inside `shape`, in the shape's own frame: u, v ∈ [−1, 1] span its bounding box
    (u right, v down). Shared by `render` and by the shape reader's templates."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u**2 + v**2 <= 1  # disc of radius 1
    if shape == "square":
        return (au <= 1) & (av <= 1)
    if shape == "triangle":  # apex (0, −1), base from (−1, 1) to (1, 1): |u| ≤ (v + 1)/2
        return (av <= 1) & (au <= (v + 1) / 2)
    if shape == "diamond":
        return au + av <= 1  # L1 ball
    if shape == "cross":  # a horizontal and a vertical bar, each CROSS_ARM of the width thick
        return ((au <= 1) & (av <= CROSS_ARM)) | ((au <= CROSS_ARM) & (av <= 1))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _background(spec: ShapeSpec, resolution: int, amplitude: float) -> np.ndarray:
    """Background colour plus a low-amplitude grey texture t ∈ [−1, 1]: rgb = colour + amplitude·t."""
    base = np.array(COLOURS[spec.background], dtype=np.float64) / 255
    if spec.texture == "plain":
        return np.broadcast_to(base, (resolution, resolution, 3)).copy()
    generator = torch.Generator().manual_seed(spec.texture_seed)
    coords = (np.arange(resolution) + 0.5) / resolution
    x, y = np.meshgrid(coords, coords)
    if spec.texture == "stripes":  # sin(2π·(x cosθ + y sinθ)/period + φ), θ a multiple of 45°
        angle, phase, period = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        theta = math.pi / 4 * int(angle * 4)
        period = 1 / 10 + period / 10  # 6–12 px at 64×64
        texture = np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + 2 * math.pi * phase)
    else:  # "noise": smooth blotches, an 8×8 Gaussian field upsampled bilinearly
        coarse = torch.randn(1, 1, 8, 8, generator=generator, dtype=torch.float64)
        field = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
        texture = (field / field.abs().max()).squeeze().numpy()
    return np.clip(base + amplitude * texture[..., None], 0, 1)


def render(spec: ShapeSpec, resolution: int = 64, supersample: int = 5,
           texture_amplitude: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Draw `spec`. Returns (image uint8 [resolution, resolution, 3], mask bool [resolution, resolution]).
    An odd `supersample` keeps coverage off exactly 1/2, so the mask has no ties for a reader to break."""
    if resolution < 8 or supersample < 1:
        raise ValueError(f"need resolution >= 8 and supersample >= 1, got {resolution}, {supersample}")
    fine = resolution * supersample
    coords = (np.arange(fine) + 0.5) / fine  # sub-pixel centres in [0, 1]
    x, y = np.meshgrid(coords, coords)
    half = spec.size / 2
    hit = inside(spec.shape, (x - spec.center[0]) / half, (y - spec.center[1]) / half)
    # [fine, fine] -> [resolution, s, resolution, s] -> mean over each s×s block
    coverage = hit.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))[..., None]
    colour = np.array(COLOURS[spec.colour], dtype=np.float64) / 255
    image = (1 - coverage) * _background(spec, resolution, texture_amplitude) + coverage * colour
    return np.round(image * 255).astype(np.uint8), coverage[..., 0] >= 0.5


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [−1, 1], the model's layout: x = pixel/127.5 − 1."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # [H, W, 3] -> [3, H, W]


def caption(spec: ShapeSpec) -> str:
    """"a red circle on a blue background". Every word is a single CLIP BPE token."""
    return f"a {spec.colour} {spec.shape} on a {spec.background} background"


_CAPTION = re.compile(r"a (\w+) (\w+)(?: on an? (\w+) background)?")


def parse_caption(text: str) -> dict[str, str | None]:
    """Inverse of `caption`; the background part may be missing ("a red circle" -> background None)."""
    match = _CAPTION.fullmatch(text.strip().lower().rstrip("."))
    if match is None:
        raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> [on a <colour> background]'")
    colour, shape, background = match.groups()
    _check_names("colour", (colour,) + ((background,) if background else ()), tuple(COLOURS))
    _check_names("shape", (shape,), SHAPES)
    return {"colour": colour, "shape": shape, "background": background}


def spec_from_caption(text: str, center: tuple[float, float] = (0.5, 0.5), size: float = 0.35,
                      background: str | None = None, texture: str = "plain") -> ShapeSpec:
    """The caption's object at a chosen place, e.g. "a red circle" at center=(0.3, 0.6) for editing tests.
    `background` is used when the caption names none."""
    words = parse_caption(text)
    chosen = words["background"] or background
    if chosen is None:
        raise ValueError(f"caption {text!r} names no background; add 'on a <colour> background' or pass "
                         "background=")
    return ShapeSpec(words["shape"], words["colour"], chosen, texture, size, center)


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain."""
    return ("a", "on", "background") + tuple(COLOURS) + SHAPES


def sample_spec(generator: torch.Generator | np.random.Generator,
                config: ToyConfig = ToyConfig()) -> ShapeSpec:
    """Draw a random spec: uniform shape, colour, background ≠ colour, texture, size, and a centre that keeps
    the whole object (plus `config.margin`) inside the image. Uses exactly 8 uniform draws from `generator`."""
    if isinstance(generator, torch.Generator):
        u = torch.rand(8, generator=generator, dtype=torch.float64).tolist()
    elif isinstance(generator, np.random.Generator):
        u = generator.random(8).tolist()
    else:
        raise ValueError(f"generator must be a torch.Generator or numpy Generator, got {type(generator).__name__}")

    def pick(options, draw):
        return options[min(int(draw * len(options)), len(options) - 1)]

    colour = pick(config.colours, u[0])
    background = pick([c for c in config.colours if c != colour], u[1])
    size = config.min_size + u[4] * (config.max_size - config.min_size)
    low, high = size / 2 + config.margin, 1 - size / 2 - config.margin  # centre range keeping it inside
    center = (low + u[5] * (high - low), low + u[6] * (high - low))
    texture_seed = int(u[7] * 2**31)
    return ShapeSpec(pick(config.shapes, u[2]), colour, background, pick(config.textures, u[3]), size, center,
                     texture_seed)


class ShapesDataset(torch.utils.data.Dataset):
    """`n` toy images. Item i depends only on (seed, i): its spec is drawn from a torch.Generator seeded with
    numpy's SeedSequence([seed, i]), so any index is reproducible on its own and in any order.

    Items are dicts {image: float [3, size, size] in [−1, 1], caption: str, mask: bool [size, size],
    spec: ShapeSpec}; use `collate` as the DataLoader's collate_fn (ShapeSpec is not a tensor).
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64, config: ToyConfig = ToyConfig()):
        if n < 0 or size < 8:
            raise ValueError(f"need n >= 0 and an image size >= 8 px, got n={n}, size={size}")
        self.n, self.seed, self.size, self.config = n, seed, size, config

    def __len__(self) -> int:
        return self.n

    def spec(self, index: int) -> ShapeSpec:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} images")
        seed = derived_seed(self.seed, index)
        return sample_spec(torch.Generator().manual_seed(seed), self.config)

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(index)
        image, mask = render(spec, self.size)
        return {"image": to_tensor(image), "caption": caption(spec), "mask": torch.from_numpy(mask), "spec": spec}


def collate(items: list[dict]) -> dict:
    """Batch dataset items: images [B, 3, H, W], masks [B, H, W], captions and specs as lists."""
    return {"image": torch.stack([item["image"] for item in items]),
            "mask": torch.stack([item["mask"] for item in items]),
            "caption": [item["caption"] for item in items],
            "spec": [item["spec"] for item in items]}
