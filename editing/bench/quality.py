"""bench quality: caption accuracy of the toy model per sampler and step count (colour and shape read back by
ldm.toy's readers from 64 images of held-out captions, as tests/test_toy_model.py reads them)."""

from __future__ import annotations

import numpy as np
import torch

from ldm.model import StableDiffusion
from ldm.pipeline import SamplingConfig, decode_latents, text_to_image
from ldm.toy import ShapesDataset, caption, read_colour, read_shape

RUNS = (("ddim", 50), ("ddim", 20), ("dpm++2m", 20), ("DPM++ 2M Karras", 20), ("unipc", 20), ("euler", 20),
        ("euler-a", 20), ("heun", 10), ("lms", 20), ("pndm", 20), ("dpm++2m-sde", 20), ("ddpm", 50))


def caption_accuracy(model: StableDiffusion, scheduler: str, steps: int, count: int = 64) -> dict[str, float]:
    data = ShapesDataset(count, seed=2024)
    specs = [data.spec(i) for i in range(count)]
    cfg = SamplingConfig(steps=steps, guidance=5.0, seed=0, height=64, width=64, scheduler=scheduler)
    with torch.no_grad():
        images = decode_latents(model, text_to_image(model, [caption(s) for s in specs], cfg, progress=False))
    images = [image.permute(1, 2, 0).numpy() for image in images]  # [3, H, W] -> [H, W, 3]
    return {"colour": float(np.mean([read_colour(im) == s.colour for im, s in zip(images, specs)])),
            "shape": float(np.mean([read_shape(im) == s.shape for im, s in zip(images, specs)]))}


def run(weights, runs=RUNS) -> str:
    model = StableDiffusion.load(weights)
    lines = ["| sampler | steps | UNet calls | colour | shape |", "|---|---|---|---|---|"]
    for scheduler, steps in runs:
        accuracy = caption_accuracy(model, scheduler, steps)
        calls = 2 * steps - 1 if scheduler == "heun" else steps + 1 if scheduler == "pndm" else steps
        lines.append(f"| {scheduler} | {steps} | {calls} | {accuracy['colour']:.0%} | {accuracy['shape']:.0%} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)
