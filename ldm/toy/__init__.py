"""The toy world: procedural shapes with captions (shapes.py) and attribute readers (readers.py) used to train
a tiny latent diffusion model here and to test editing methods on meaning."""

from .readers import (mask_iou, nearest_colour, object_mask, read_attributes, read_background, read_colour,
                      read_shape, shape_scores)
from .shapes import (COLOURS, SHAPES, TEXTURES, ShapesDataset, ShapeSpec, ToyConfig, caption, collate,
                     inside, parse_caption, render, sample_spec, spec_from_caption, to_tensor, vocabulary)

__all__ = ["COLOURS", "SHAPES", "TEXTURES", "ShapeSpec", "ShapesDataset", "ToyConfig", "caption", "collate",
           "inside", "mask_iou", "nearest_colour", "object_mask", "parse_caption", "read_attributes",
           "read_background", "read_colour", "read_shape", "render", "sample_spec", "shape_scores",
           "spec_from_caption", "to_tensor", "vocabulary"]
