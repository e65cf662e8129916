"""editlab ddpm-stats: how edit-friendly noise maps differ from the native DDPM noise (a teaching script).

A plain DDPM sampling run draws x_T and every z_t from N(0, I), independently. The edit-friendly maps of the
image it produced (or of a real image, --image) are extracted with ``inversion.ddpm_noise.invert``. The paper
(Sec. 2.2) observes that they have a higher per-pixel variance than 1 and that consecutive maps are negatively
correlated: z_t = (x_{t−1} − μ_t(x_t))/σ_t contains ε̃_{t−1} with a positive sign and, through μ_{t−1}(x_{t−1}),
z_{t−1} contains it with a negative one. This prints both statistics per step and on average.
"""

from __future__ import annotations

import torch

from editing.ddpm_edit.noise_space import noise_statistics
from inversion.ddpm_noise import DDPMInversionConfig, invert, sample_native
from ldm.images import load_image
from ldm.pipeline import check_image_size, encode_images

from ..options import add_model_arguments, load_model, native_size

NAME = "ddpm-stats"
HELP = "compare the variance and step-to-step correlation of edit-friendly and native DDPM noise maps"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="a red circle on a blue background",
                        help="prompt of the sampling run and of the inversion")
    parser.add_argument("--image", default=None, help="invert this image instead of the sampled one")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=3.5, help="CFG scale of sampling and inversion")
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="images (batch) the statistics average over")
    parser.add_argument("--every", type=int, default=10, help="print every k-th step")
    parser.add_argument("--size", type=int, default=None, help="side of the sampled images (default: the model's)")


@torch.no_grad()
def measure(model, prompt: str, cfg: DDPMInversionConfig, seed: int, samples: int, image: torch.Tensor | None = None,
            side: int | None = None) -> dict[str, torch.Tensor]:
    """Per-step variance and consecutive correlation of native and edit-friendly maps (averaged over samples)."""
    factor = model.config.vae.downsample_factor
    side = side or native_size(model)
    check_image_size(side, side, factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    native = sample_native(model, [prompt] * samples, (side // factor, side // factor), cfg, generator)
    if image is None:
        x0 = native.latents[-1]
    else:
        check_image_size(image.shape[-2], image.shape[-1], factor)
        x0 = encode_images(model, image).expand(samples, -1, -1, -1)
    friendly = invert(model, x0, prompt, cfg, generator)
    native_var, native_corr = noise_statistics(native.noise_maps)
    friendly_var, friendly_corr = noise_statistics(friendly.noise_maps)
    return {"timesteps": friendly.timesteps, "native_variance": native_var, "friendly_variance": friendly_var,
            "native_correlation": native_corr, "friendly_correlation": friendly_corr}


def report(stats: dict[str, torch.Tensor], every: int) -> str:
    lines = [f"{'step':>5} {'t':>5} | {'variance native':>16} {'edit-friendly':>14} | "
             f"{'corr(z_t, z_t-1) native':>24} {'edit-friendly':>14}"]
    steps = len(stats["timesteps"])
    for i in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        corr = (f"{stats['native_correlation'][i]:>24.3f} {stats['friendly_correlation'][i]:>14.3f}"
                if i < steps - 1 else f"{'':>24} {'':>14}")
        lines.append(f"{i:>5} {int(stats['timesteps'][i]):>5} | {stats['native_variance'][i]:>16.3f} "
                     f"{stats['friendly_variance'][i]:>14.3f} | {corr}")
    lines.append(f"{'mean':>11} | {stats['native_variance'].mean():>16.3f} {stats['friendly_variance'].mean():>14.3f}"
                 f" | {stats['native_correlation'].mean():>24.3f} {stats['friendly_correlation'].mean():>14.3f}")
    lines.append(f"{'median':>11} | {stats['native_variance'].median():>16.3f} "
                 f"{stats['friendly_variance'].median():>14.3f} | {stats['native_correlation'].median():>24.3f} "
                 f"{stats['friendly_correlation'].median():>14.3f}")
    return "\n".join(lines)


def run(args):
    if args.samples < 1 or args.every < 1:
        raise ValueError(f"--samples and --every must be at least 1, got {args.samples} and {args.every}")
    cfg = DDPMInversionConfig(steps=args.steps, eta=args.eta, source_guidance=args.guidance)
    model = load_model(args)
    image = load_image(args.image) if args.image else None
    stats = measure(model, args.prompt, cfg, args.seed, args.samples, image, args.size)
    print(report(stats, args.every))
