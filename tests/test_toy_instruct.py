"""The bundled toy InstructPix2Pix model (ldm/toy/weights/toy-ip2p.safetensors: the toy UNet fine-tuned by
`editlab train-ip2p` on pairs that `editlab make-pairs` drew with Prompt-to-Prompt from the toy model itself)
and Visii on it: does a written instruction recolour the object, and does an instruction learned from one
before/after colour change recolour a different shape the same way (issue 10)."""

import numpy as np
import pytest
import torch

from editing.instruct_pix2pix.editor import EditConfig, apply_instruction, edit_by_instruction
from editing.options import TOY_IP2P_WEIGHTS
from inversion.visii import VisiiConfig, train_visii, visii_training
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents
from ldm.toy import ShapeSpec, object_mask, read_colour, read_shape, render

pytestmark = pytest.mark.skipif(not TOY_IP2P_WEIGHTS.is_file(), reason="toy InstructPix2Pix weights not built")
SEEDS = 10
EDIT = EditConfig(steps=20, text_guidance=7.5, image_guidance=1.5, scheduler="ddim")  # Euler-a: 7/10 recoloured
# Visii: the reference's 1000 steps (each timestep once), but lr 1e-2: with its 1e-3 the learned states had not
# moved far enough on this model (1/10 green, measured); 1e-2 gave 10/10. About 45 s on one CPU thread.
TRAIN_STEPS, LR = 1000, 1e-2


@pytest.fixture(scope="module")
def model():
    return StableDiffusion.load(TOY_IP2P_WEIGHTS)


def image_of(spec: ShapeSpec) -> torch.Tensor:
    return torch.from_numpy(render(spec)[0]).permute(2, 0, 1)[None].float() / 255  # [H, W, 3] -> [1, 3, H, W]


def reads(model, latents: torch.Tensor) -> list[tuple[str, str]]:
    """(colour, shape) of the object in each decoded image."""
    out = []
    for image in decode_latents(model, latents):
        rgb = image.permute(1, 2, 0).double().numpy()  # [3, H, W] in [0, 1] -> [H, W, 3]
        out.append((read_colour(rgb, object_mask(rgb)), read_shape(rgb)))
    return out


def test_written_instruction_recolours_the_object_and_keeps_its_shape(model):
    square = image_of(ShapeSpec("square", "blue", "white", size=0.42, center=(0.5, 0.5)))
    latents = edit_by_instruction(model, square.repeat(SEEDS, 1, 1, 1), ["make the square green"] * SEEDS, EDIT,
                                  progress=False)
    outcomes = reads(model, latents)  # one noise draw per row: SEEDS different edits
    assert sum(o == ("green", "square") for o in outcomes) >= 0.8 * SEEDS, outcomes


def test_visii_instruction_from_one_colour_change_recolours_another_shape(model):
    """Learned from red circle -> green circle only, applied to a blue square: it turns green. The CLIP term
    is off (clip_weight 0): the toy world has no trained CLIP, and the MSE term alone carries the edit."""
    import open_clip

    before = image_of(ShapeSpec("circle", "red", "white", size=0.42, center=(0.5, 0.5)))
    after = image_of(ShapeSpec("circle", "green", "white", size=0.42, center=(0.5, 0.5)))
    torch.manual_seed(0)
    stand_in = open_clip.model.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "layers": 1, "width": 32,
                                    "head_width": 16, "patch_size": 8}, text_cfg={"width": 64, "heads": 2, "layers": 1}).eval()
    result = train_visii(model, stand_in, before, after, "make the shape", VisiiConfig(clip_weight=0.0),
                         visii_training(steps=TRAIN_STEPS, lr=LR, seed=0, checkpoint_every=10**6), progress=False)
    square = image_of(ShapeSpec("square", "blue", "white", size=0.42, center=(0.5, 0.5)))
    latents = apply_instruction(model, square.repeat(SEEDS, 1, 1, 1), result.instruction, EDIT, progress=False)
    outcomes = reads(model, latents)
    assert sum(colour == "green" for colour, _ in outcomes) >= 0.7 * SEEDS, outcomes
    baseline = reads(model, apply_instruction(model, square.repeat(SEEDS, 1, 1, 1),
                                              model.encode_prompt(["make the shape"])[0], EDIT, progress=False))
    assert sum(colour == "green" for colour, _ in baseline) <= 0.3 * SEEDS, baseline  # the init prompt alone
