"""Toy-world metrics: the exact target and the attribute readers (ldm/toy/readers.py) say whether the edit
happened and what else changed.

- target_psnr: PSNR of the output against the exact edited scene (10·log10(1/MSE), whole image);
- edit_accuracy: 1 when the readers read the edited attribute of the output as the target's (object colour,
  shape or background colour), else 0; texture edits have no reader, so no accuracy;
- kept_accuracy: the fraction of the other attributes (of colour, shape, background) read as in the source;
- edit_success: 1 when the edit is read (edit_accuracy 1) and every other attribute is read as in the source
  (kept_accuracy 1): a model that repaints the whole scene in the named colour is read as having the named
  colour somewhere, so edit_accuracy alone credits it; edit_success does not;
- object_iou: IoU(object mask read from the output, the target scene's object mask);
- hint_iou (ControlNet on the toy): IoU(object mask read from the output, the source scene's object mask,
  from which the hint was made: the mask hint itself, or the object the Canny edges outline).
"""

from __future__ import annotations

import torch

from ldm.toy.readers import mask_iou, object_mask, read_background, read_colour, read_shape

from .pixels import psnr

READ = {"colour": lambda image, mask: read_colour(image, mask),
        "shape": lambda image, mask: read_shape(image, mask),
        "background": lambda image, mask: read_background(image)}


def read_all(image: torch.Tensor) -> tuple[dict, object]:
    rgb = image.permute(1, 2, 0).double().numpy()  # [3, H, W] -> [H, W, 3] in [0, 1]
    mask = object_mask(rgb)
    return {name: read(rgb, mask) for name, read in READ.items()}, mask


def toy_metrics(case, output: torch.Tensor) -> dict[str, float]:
    read, mask = read_all(output)
    values = {"target_psnr": psnr(output, case.target), "object_iou": mask_iou(mask, case.target_object_mask)}
    if case.kind in READ:
        values["edit_accuracy"] = float(read[case.kind] == case.target_attributes[case.kind])
    others = [name for name in READ if name != case.kind]
    values["kept_accuracy"] = sum(read[n] == case.source_attributes[n] for n in others) / len(others)
    if "edit_accuracy" in values:
        values["edit_success"] = float(values["edit_accuracy"] == 1 and values["kept_accuracy"] == 1)
    return values


def hint_iou(output: torch.Tensor, source_object_mask: torch.Tensor) -> float:
    """IoU of the object read from the output with the source scene's object: the mask hint itself, or the
    object whose outline the Canny hint draws."""
    _, mask = read_all(output)
    return mask_iou(mask, source_object_mask)
