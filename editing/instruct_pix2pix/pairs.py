"""InstructPix2Pix's paired-data recipe: render a caption pair before and after, keep the samples CLIP likes.

Paper: *InstructPix2Pix: Learning to Follow Image Editing Instructions* (Brooks, Holynski, Efros, CVPR 2023),
§3.1.2; the public script is dataset_creation/generate_img_dataset.py (docs/methods.md §6.2). For each caption pair
(input caption c_0, edited caption c_1, instruction) and each of N samples:

    seed, u_p, u_w  from the pair's generator (seeded by (recipe seed, pair index))
    p = p_lo + u_p·(p_hi − p_lo)          p ~ U(0.1, 0.9), the injected fraction of the steps
    w = w_lo + u_w·(w_hi − w_lo)          w ~ U(7.5, 15), one guidance scale for both rows
    x_T ~ N(0, I) from ``seed``, shared by both rows (and so is every sampler step's noise)
    sample [c_0; c_1] together; at step i (of N_s) with i / (N_s − 1) < p every self-attention layer of the
    edited row takes the source row's map, A_1 ← A_0 (Prompt-to-Prompt, Hertz et al., on self-attention
    only; no cross-attention edit, so the captions need no word alignment)

The reference copies the source's self-attention in the unconditional half of the CFG batch too
(``PairInjection`` edits both halves). Many (caption pair, draw) items share one sampling loop
(``render_pairs``): rows [before_0, after_0, before_1, after_1, …] in each CFG half, each item with its own
seed, w and injection window, so a batch equals its items rendered one at a time up to kernel rounding.

CLIP filters, on L2-normalised embeddings ê = E_img(x)/‖E_img(x)‖ and t̂ = E_txt(c)/‖E_txt(c)‖:

    image-text   s_0 = cos(ê_0, t̂_0),  s_1 = cos(ê_1, t̂_1)       both ≥ 0.2
    image-image  s_I = cos(ê_0, ê_1)                            ≥ 0.75 (paper; the script uses 0.7)
    direction    s_D = cos(ê_1 − ê_0, t̂_1 − t̂_0)                ≥ 0.2

The survivors are ranked by s_D (largest first) and at most K (4) are kept. For the toy world,
toy_pairs.py replaces CLIP by the toy world's attribute readers (``ToyFilter``).
The paper's CLIP is ViT-L/14; any open_clip CLIP works (ldm/clip_models.py; its resize is antialiased, the
reference's bicubic resize is not). Images are scored as decoded (float), before rounding to 8-bit PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ldm.attention import attached
from ldm.clip_models import clip_image_features, clip_text_features
from ldm.hooks import AttentionHook, guidance_rows
from ldm.model import StableDiffusion
from ldm.pipeline import (SamplingConfig, check_image_size, decode_latents, denoise, guided_unet, sampler_for,
                          text_context)
from ldm.schedulers import gaussian_noise
from ldm.seeding import derived_seed

SCORES = ("image_text_before", "image_text_after", "image_image", "direction")


@dataclass(frozen=True)
class PairRecipe:
    """The recipe of docs/methods.md §6.2 (defaults: the paper's; the script keeps image-image ≥ 0.7)."""

    samples: int = 100  # N samples rendered per caption pair
    keep: int = 4  # at most K kept per caption pair
    p_range: tuple[float, float] = (0.1, 0.9)  # injected fraction p ~ U(p_lo, p_hi)
    guidance_range: tuple[float, float] = (7.5, 15.0)  # CFG scale w ~ U(w_lo, w_hi)
    steps: int = 100
    scheduler: str = "euler-a"
    spacing: str | None = None  # the shared sampling options (ldm.pipeline.SamplingConfig)
    karras: bool | None = None
    rescale_zero_snr: bool | None = None
    guidance_rescale: float = 0.0
    negative: str | None = None  # negative prompt of every sample
    seed: int = 0
    height: int = 512
    width: int = 512
    min_image_text: float = 0.2  # s_0, s_1
    min_image_image: float = 0.75  # s_I
    min_direction: float = 0.2  # s_D

    def __post_init__(self):
        if self.samples < 1 or self.keep < 1 or self.steps < 1:
            raise ValueError(f"samples, keep and steps must be ≥ 1, got {self.samples}, {self.keep}, {self.steps}")
        (p_lo, p_hi), (w_lo, w_hi) = self.p_range, self.guidance_range
        if not 0.0 <= p_lo <= p_hi <= 1.0:
            raise ValueError(f"p range ({p_lo}, {p_hi}) must satisfy 0 <= low <= high <= 1")
        if not 0.0 <= w_lo <= w_hi:
            raise ValueError(f"guidance range ({w_lo}, {w_hi}) must satisfy 0 <= low <= high")
        if w_lo <= 1.0 < w_hi:  # w ≤ 1 runs without CFG: one batch could not hold both kinds of sample
            raise ValueError(f"guidance range ({w_lo}, {w_hi}) straddles 1; keep both ends above 1 (or both <= 1)")

    def sampling(self, seed: int, guidance: float) -> SamplingConfig:
        return SamplingConfig(steps=self.steps, guidance=guidance, scheduler=self.scheduler, seed=seed,
                              height=self.height, width=self.width, spacing=self.spacing, karras=self.karras,
                              rescale_zero_snr=self.rescale_zero_snr, guidance_rescale=self.guidance_rescale)


@dataclass(frozen=True)
class SampleDraw:
    seed: int  # x_T and every step's noise
    p: float  # injected fraction of the steps
    guidance: float  # w


def pair_generator(seed: int, pair_index: int) -> torch.Generator:
    """The generator of caption pair ``pair_index``: depends only on (seed, index) (numpy SeedSequence)."""
    state = derived_seed(seed, pair_index)
    return torch.Generator().manual_seed(state)


def draw_samples(recipe: PairRecipe, pair_index: int) -> list[SampleDraw]:
    """The N draws of one caption pair, three per sample in the order seed, p, w."""
    generator, draws = pair_generator(recipe.seed, pair_index), []
    (p_lo, p_hi), (w_lo, w_hi) = recipe.p_range, recipe.guidance_range
    for _ in range(recipe.samples):
        seed = int(torch.randint(2**32, (), generator=generator))  # as the reference: < 2^32
        u_p, u_w = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        draws.append(SampleDraw(seed, p_lo + u_p * (p_hi - p_lo), w_lo + u_w * (w_hi - w_lo)))
    return draws


def injected_steps(p: float, steps: int) -> range:
    """Steps i with i / (N_s − 1) < p (the reference's rule; N_s = 1: step 0 when p > 0)."""
    return range(sum(1 for i in range(steps) if i / max(steps - 1, 1) < p))


@dataclass(frozen=True)
class PairItem:
    """One rendering job: a caption pair and one sample's draw."""

    before: str
    after: str
    draw: SampleDraw


class PairInjection(AttentionHook):
    """Attention and step hook for a batch of caption pairs laid out [before_0, after_0, before_1, after_1, …]
    in each CFG half: while step i < cutoff_j (= len(injected_steps(p_j, N_s))) every self-attention layer
    gives item j's after row its before row's map, A_{after,j} ← A_{before,j}, in the unconditional and the
    conditional half alike (the reference copies the source's map in both halves). Whole maps are replaced
    (``map_sources``). Every attached layer must run once per step (ldm.hooks' layer-count contract)."""

    def __init__(self, cutoffs: list[int]):
        self.cutoffs = list(cutoffs)
        self.step = 0

    def begin_step(self, i: int, t) -> None:
        super().begin_step(i, t)
        self.step = i

    def active(self) -> list[int]:
        """Items whose after row is injected in the current step."""
        return [j for j, cutoff in enumerate(self.cutoffs) if self.step < cutoff]

    def wants_probabilities(self, layer) -> bool:
        # Every self-attention layer takes the explicit path in every step, injected or not: then an item's
        # numbers do not depend on its batch-mates' windows (the fused kernel on the CPU rounds differently
        # with the batch size), and a batch equals its items rendered alone. It costs little at make-pairs'
        # sizes: some item is injected in most steps anyway.
        return layer.kind == "self"

    def map_sources(self, layer, n_rows: int) -> torch.Tensor | None:
        if layer.kind != "self":
            return None
        n = 2 * len(self.cutoffs)
        sources = torch.arange(n_rows)  # row r takes row sources[r]'s map
        for half in guidance_rows(n_rows, n):
            for j in self.active():
                if half.stop > half.start:
                    sources[half.start + 2 * j + 1] = half.start + 2 * j  # after_j ← before_j
        return sources


@torch.no_grad()
def render_pairs(model: StableDiffusion, items: list[PairItem], recipe: PairRecipe,
                 progress: bool = False) -> torch.Tensor:
    """Render B items in one sampling loop; returns the final latents [2B, C, h, w], rows
    [before_0, after_0, before_1, …]. Item j has its own noise (both its rows from ``draw.seed``, as when
    rendered alone), its own guidance w_j (per-row scales) and its own injection window; the result equals
    rendering each item alone (``render_pair``) on the CPU, bit for bit where the kernels are batch-invariant."""
    if not items:
        raise ValueError("render_pairs got no items; pass at least one (caption pair, draw)")
    cfg = recipe.sampling(items[0].draw.seed, items[0].draw.guidance)
    check_image_size(cfg.height, cfg.width, model.config.vae.downsample_factor)
    sampler = sampler_for(model, cfg)
    generators = [torch.Generator("cpu").manual_seed(item.draw.seed) for item in items for _ in range(2)]
    prompts = [caption for item in items for caption in (item.before, item.after)]
    guidance = [item.draw.guidance for item in items for _ in range(2)]  # w_j on both rows of item j
    context = text_context(model, prompts, recipe.negative, guidance)  # [∅ × 2B; c_0, c'_0, c_1, c'_1, …]
    predict = guided_unet(model.unet, context, guidance, recipe.guidance_rescale)
    f, channels = model.config.vae.downsample_factor, model.config.vae.latent_channels
    shape = (2 * len(items), channels, cfg.height // f, cfg.width // f)
    latents = gaussian_noise(shape, generators, model.device, context.dtype) * sampler.init_noise_sigma
    hook = PairInjection([len(injected_steps(item.draw.p, len(sampler))) for item in items])
    with attached(model.unet, hook):
        return denoise(sampler, predict, latents, generators, hooks=[hook], progress=progress)


def render_pair(model: StableDiffusion, before: str, after: str, draw: SampleDraw, recipe: PairRecipe,
                progress: bool = False) -> torch.Tensor:
    """One item alone: latents [2, C, h, w] (row 0: before, the plain generation of ``before``)."""
    return render_pairs(model, [PairItem(before, after, draw)], recipe, progress)


# --------------------------------------------------------------------------------------------- CLIP filters


def clip_scores(image_before: torch.Tensor, image_after: torch.Tensor, text_before: torch.Tensor,
                text_after: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four CLIP similarities of [B, D] embeddings (normalised here), each [B] (formulas: module doc)."""
    e0, e1, t0, t1 = (F.normalize(x.float(), dim=-1) for x in (image_before, image_after, text_before, text_after))
    return {"image_text_before": F.cosine_similarity(e0, t0, dim=-1),  # s_0 = cos(ê_0, t̂_0)
            "image_text_after": F.cosine_similarity(e1, t1, dim=-1),  # s_1 = cos(ê_1, t̂_1)
            "image_image": F.cosine_similarity(e0, e1, dim=-1),  # s_I = cos(ê_0, ê_1)
            "direction": F.cosine_similarity(e1 - e0, t1 - t0, dim=-1)}  # s_D = cos(ê_1 − ê_0, t̂_1 − t̂_0)


def passes_filters(scores: dict[str, torch.Tensor], recipe: PairRecipe) -> torch.Tensor:
    """[B] bool: s_0, s_1 ≥ min_image_text, s_I ≥ min_image_image and s_D ≥ min_direction."""
    image_text = torch.minimum(scores["image_text_before"], scores["image_text_after"]) >= recipe.min_image_text
    image_image = scores["image_image"] >= recipe.min_image_image
    return image_text & image_image & (scores["direction"] >= recipe.min_direction)


def select_samples(scores: dict[str, torch.Tensor], recipe: PairRecipe) -> list[int]:
    """Indices of the kept samples: those passing the filters, by s_D from the largest, at most K."""
    passing = passes_filters(scores, recipe).nonzero().flatten().tolist()
    direction = scores["direction"].tolist()
    return sorted(passing, key=lambda i: -direction[i])[: recipe.keep]


class ClipFilter:
    """The CLIP filters as a sample filter: ``scores(before, after, images)`` -> the four similarities of one
    sample ([2, 3, H, W], before and after), ``select(scores)`` -> the kept indices, best first."""

    def __init__(self, clip_model, recipe: PairRecipe):
        self.clip_model, self.recipe = clip_model, recipe
        self._text: dict[tuple[str, str], torch.Tensor] = {}  # the last caption pair's text embeddings

    def describe(self) -> str:
        r = self.recipe
        return (f"the CLIP filters (image-text >= {r.min_image_text}, image-image >= {r.min_image_image}, "
                f"direction >= {r.min_direction}); lower --min-image-text / --min-image-image / --min-direction")

    def scores(self, before: str, after: str, images: torch.Tensor) -> dict[str, float]:
        if (before, after) not in self._text:
            self._text = {(before, after): clip_text_features(self.clip_model, [before, after])}  # [2, D]
        text = self._text[(before, after)]
        embeddings = clip_image_features(self.clip_model, images)  # [2, D]
        scores = clip_scores(embeddings[:1], embeddings[1:], text[:1], text[1:])
        return {name: float(value[0]) for name, value in scores.items()}

    def select(self, scores: list[dict]) -> list[int]:
        table = {name: torch.tensor([s[name] for s in scores], dtype=torch.float64) for name in SCORES}
        return select_samples(table, self.recipe)


# ------------------------------------------------------------------------------------------- caption pairs


@dataclass
class PairSample:
    draw: SampleDraw
    scores: dict  # the filter's scores (CLIP similarities, or the toy readers' reads)
    rank: int | None = None  # position among the kept samples (0: the best), None when dropped
    images: torch.Tensor | None = None  # [2, 3, H, W] in [0, 1] (before, after); kept samples only


@torch.no_grad()
def make_caption_pairs(model: StableDiffusion, captions: list[tuple[str, str]], recipe: PairRecipe, sample_filter,
                       batch: int = 16, progress: bool = False,
                       indices: list[int] | None = None) -> Iterator[tuple[int, list[PairSample]]]:
    """Render the N samples of every caption pair (before, after), ``batch`` (caption pair, draw) items per
    sampling loop, score each with ``sample_filter`` (ClipFilter, toy_pairs.ToyFilter) and rank the kept ones.
    Yields (pair index, its N samples) in caption order as soon as a pair is complete. Only the images of
    the (at most K) samples still in the running are held, so memory does not grow with N. ``indices``: the
    caption pairs' indices in the whole list (their draws depend on them; default 0, 1, …), yielded as such."""
    if batch < 1:
        raise ValueError(f"batch {batch}: render at least 1 item per sampling loop")
    indices = list(range(len(captions))) if indices is None else list(indices)
    jobs = [(k, draw) for k, index in enumerate(indices) for draw in draw_samples(recipe, index)]
    pending: dict[int, list[PairSample]] = {index: [] for index in range(len(captions))}
    done = 0  # the next caption pair to yield
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        items = [PairItem(*captions[index], draw) for index, draw in chunk]
        images = decode_latents(model, render_pairs(model, items, recipe, progress)).cpu()  # [2B, 3, H, W]
        for k, (index, draw) in enumerate(chunk):
            pair = images[2 * k:2 * k + 2].clone()  # [2, 3, H, W]; a copy, so the batch can be freed
            samples = pending[index]
            samples.append(PairSample(draw, sample_filter.scores(*captions[index], pair), images=pair))
            kept = set(sample_filter.select([s.scores for s in samples]))
            for position, sample in enumerate(samples):
                sample.images = sample.images if position in kept else None
        while done < len(captions) and len(pending[done]) == recipe.samples:
            samples = pending.pop(done)
            for rank, position in enumerate(sample_filter.select([s.scores for s in samples])):
                samples[position].rank = rank
            yield indices[done], samples
            done += 1
