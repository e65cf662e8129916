"""One editing test case, as every benchmark yields it, and the images' conventions.

Images are float tensors [3, H, W] in [0, 1]; masks are bool [H, W] with True = the region the edit may change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EditCase:
    id: str
    image: torch.Tensor  # source image [3, H, W] in [0, 1]
    source_prompt: str
    target_prompt: str
    instruction: str  # the same edit as an instruction ("make the circle green"); "" when unknown
    words: tuple[str, str] = ("", "")  # (source word, target word): the blended words; ("", "") when unknown
    mask: torch.Tensor | None = None  # bool [H, W], True = edited region; None when the benchmark has none
    target: torch.Tensor | None = None  # ground-truth edited image [3, H, W]; None when unknown
    kind: str = ""  # edit type ("colour", "shape", ..., or PIE-Bench's editing_type_id)
    source_attributes: dict = field(default_factory=dict)  # toy: shape, colour, background, texture
    target_attributes: dict = field(default_factory=dict)
    source_object_mask: torch.Tensor | None = None  # toy: the object's pixels (bool [H, W]) in the source scene
    target_object_mask: torch.Tensor | None = None  # toy: the object's pixels in the target scene

    def __post_init__(self):
        if self.image.ndim != 3 or self.image.shape[0] != 3:
            raise ValueError(f"case {self.id}: image must be [3, H, W], got {tuple(self.image.shape)}")
        size = tuple(self.image.shape[-2:])
        if self.mask is not None and tuple(self.mask.shape) != size:
            raise ValueError(f"case {self.id}: mask {tuple(self.mask.shape)} does not match the image {size}")
        if self.target is not None and tuple(self.target.shape) != tuple(self.image.shape):
            raise ValueError(f"case {self.id}: target {tuple(self.target.shape)} does not match the image "
                             f"{tuple(self.image.shape)}")


def uint8_to_unit(image) -> torch.Tensor:
    """uint8 numpy [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255  # [H, W, 3] -> [3, H, W]
