"""``toy-edits``: procedural editing cases from the toy world, each with its exact ground truth.

Case i depends only on (seed, i) (ldm/seeding.derived_seed, as ldm/toy/shapes.ShapesDataset): a random toy
scene (shapes.sample_spec) and one edit of it, chosen round-robin over ``kinds`` so that any prefix is balanced:

| kind       | change                                     | instruction                      | edit mask            |
|------------|--------------------------------------------|----------------------------------|----------------------|
| colour     | object colour -> another (≠ background)    | "make the circle green"          | object               |
| shape      | shape -> another                           | "turn the circle into a square"  | old ∪ new object     |
| background | background colour -> another (≠ object)    | "make the background yellow"     | everything but object|
| texture    | background texture -> another              | "make the background striped"    | everything but object|

Both scenes are rendered by shapes.render with the same geometry and texture seed, so the target image is the
exact edit: no other editing benchmark has one for every case. Toy captions do not name the texture, so a
texture edit's target prompt adds its word ("a red circle on a blue striped background"); the toy model never
saw those words, and no reader measures texture, so texture cases have no edit accuracy.
The default set is the first 200 cases of seed 0; any other count or seed generates more.
"""

from __future__ import annotations

import dataclasses

import torch

from ldm.seeding import derived_seed
from ldm.toy.shapes import COLOURS, SHAPES, TEXTURES, ShapeSpec, caption, render, sample_spec

from ..cases import EditCase, uint8_to_unit

KINDS = ("colour", "shape", "background", "texture")
TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "noise": "noisy"}


def _pick(options: list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def edit_spec(spec: ShapeSpec, kind: str, u: float) -> tuple[ShapeSpec, str, tuple[str, str]]:
    """(edited spec, instruction, (source word, target word)) for one edit of ``kind``; ``u`` in [0, 1)."""
    if kind == "colour":
        colour = _pick([c for c in COLOURS if c not in (spec.colour, spec.background)], u)
        return dataclasses.replace(spec, colour=colour), f"make the {spec.shape} {colour}", (spec.colour, colour)
    if kind == "shape":
        shape = _pick([s for s in SHAPES if s != spec.shape], u)
        return dataclasses.replace(spec, shape=shape), f"turn the {spec.shape} into a {shape}", (spec.shape, shape)
    if kind == "background":
        background = _pick([c for c in COLOURS if c not in (spec.colour, spec.background)], u)
        return (dataclasses.replace(spec, background=background), f"make the background {background}",
                (spec.background, background))
    if kind == "texture":
        texture = _pick([t for t in TEXTURES if t != spec.texture], u)
        return (dataclasses.replace(spec, texture=texture), f"make the background {TEXTURE_WORDS[texture]}",
                ("", TEXTURE_WORDS[texture]))
    raise ValueError(f"unknown toy edit kind {kind!r}; choose from {', '.join(KINDS)}")


def target_prompt(spec: ShapeSpec, kind: str) -> str:
    if kind == "texture":
        return f"a {spec.colour} {spec.shape} on a {spec.background} {TEXTURE_WORDS[spec.texture]} background"
    return caption(spec)


def attributes(spec: ShapeSpec) -> dict:
    return {"shape": spec.shape, "colour": spec.colour, "background": spec.background, "texture": spec.texture}


class ToyEdits:
    """``n`` toy editing cases of ``kinds`` at ``size``×``size`` pixels; case i depends only on (seed, i, kinds)."""

    def __init__(self, n: int = 200, seed: int = 0, size: int = 64, kinds: tuple[str, ...] = KINDS):
        bad = [k for k in kinds if k not in KINDS]
        if n < 1 or bad or not kinds:
            raise ValueError(f"toy-edits needs n >= 1 and kinds from {KINDS}, got n={n}, kinds={kinds}")
        self.n, self.seed, self.size, self.kinds = n, seed, size, tuple(kinds)

    def specs(self, index: int) -> tuple[ShapeSpec, ShapeSpec, str, str, tuple[str, str]]:
        """(source spec, target spec, kind, instruction, words) of case ``index``."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, index))
        source = sample_spec(generator)  # 8 draws
        kind = self.kinds[index % len(self.kinds)]
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        target, instruction, words = edit_spec(source, kind, u)
        return source, target, kind, instruction, words

    def case(self, index: int) -> EditCase:
        source, target, kind, instruction, words = self.specs(index)
        image, source_mask = render(source, self.size)
        edited, target_mask = render(target, self.size)
        if kind == "colour":
            mask = source_mask
        elif kind == "shape":
            mask = source_mask | target_mask
        else:
            mask = ~source_mask
        return EditCase(id=f"toy-{self.seed}-{index:05d}", image=uint8_to_unit(image), source_prompt=caption(source),
                        target_prompt=target_prompt(target, kind), instruction=instruction, words=words,
                        mask=torch.from_numpy(mask), target=uint8_to_unit(edited), kind=kind,
                        source_attributes=attributes(source), target_attributes=attributes(target),
                        source_object_mask=torch.from_numpy(source_mask),
                        target_object_mask=torch.from_numpy(target_mask))

    def cases(self) -> list[EditCase]:
        return [self.case(i) for i in range(self.n)]
