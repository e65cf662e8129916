"""Toy world: the data set renders what its captions say, and the attribute readers recover it, also from
images degraded the way a small generative model degrades them (blur, noise, colour shift)."""

import numpy as np
import pytest
import torch

from ldm.toy import (COLOURS, SHAPES, TEXTURES, ShapesDataset, ShapeSpec, ToyConfig, caption, collate,
                     mask_iou, object_mask, parse_caption, read_attributes, read_background, read_colour,
                     read_shape, render, sample_spec, spec_from_caption, vocabulary)


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma + 0.5)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    padded = np.pad(rgb, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = rgb.shape[:2]
    rows = sum(w * padded[i:i + height] for i, w in enumerate(taps))
    return sum(w * rows[:, i:i + width] for i, w in enumerate(taps))


def degrade(image: np.ndarray, generator: torch.Generator, blur: float, noise: float, shift: float,
            desaturate: float) -> np.ndarray:
    """uint8 image -> float [0, 1]: Gaussian blur, additive noise, per-channel gain and offset in ±shift,
    then a blend towards grey (model outputs are often washed out)."""
    rgb = gaussian_blur(image / 255, blur)
    rgb = rgb + noise * torch.randn(rgb.shape, generator=generator, dtype=torch.float64).numpy()
    gain_offset = 2 * torch.rand(6, generator=generator, dtype=torch.float64).numpy() - 1
    rgb = rgb * (1 + shift * gain_offset[:3]) + shift * gain_offset[3:]
    rgb = (1 - desaturate) * rgb + desaturate * rgb.mean(axis=2, keepdims=True)
    return np.clip(rgb, 0, 1)


@pytest.fixture(scope="module")
def rendered():
    dataset = ShapesDataset(200, seed=0)
    return [(dataset.spec(i), *render(dataset.spec(i))) for i in range(len(dataset))]


def reader_scores(samples) -> dict[str, float]:
    hits = {"colour": 0, "shape": 0, "background": 0}
    ious = []
    for spec, image, true_mask in samples:
        read = read_attributes(image)
        hits["colour"] += read["colour"] == spec.colour
        hits["shape"] += read["shape"] == spec.shape
        hits["background"] += read["background"] == spec.background
        ious.append(mask_iou(read["mask"], true_mask))
    return {**{name: count / len(samples) for name, count in hits.items()}, "iou": float(np.mean(ious))}


def test_readers_recover_ground_truth(rendered):
    # measured on these 200: every accuracy 1.000, mean IoU 1.000
    scores = reader_scores(rendered)
    assert scores["colour"] >= 0.98 and scores["background"] >= 0.98, scores
    assert scores["shape"] >= 0.95 and scores["iou"] >= 0.9, scores


@pytest.mark.parametrize("blur, noise, shift, desaturate, minimum", [
    # measured: colour / shape / background 1.000, mean IoU 0.96
    (1.0, 0.05, 0.04, 0.1, {"colour": 0.95, "shape": 0.93, "background": 0.95, "iou": 0.9}),
    # harsher than a trained model should be; measured 1.000 / 0.98 / 1.000, mean IoU 0.91
    (1.5, 0.1, 0.1, 0.2, {"colour": 0.9, "shape": 0.9, "background": 0.9, "iou": 0.85}),
])
def test_readers_survive_degradation(rendered, blur, noise, shift, desaturate, minimum):
    generator = torch.Generator().manual_seed(1)
    samples = rendered if blur == 1.0 else rendered[:100]
    degraded = [(spec, degrade(image, generator, blur, noise, shift, desaturate), mask)
                for spec, image, mask in samples]
    scores = reader_scores(degraded)
    assert all(scores[name] >= minimum[name] for name in minimum), scores


def test_render_geometry_and_antialiasing():
    spec = spec_from_caption("a red circle on a blue background", center=(0.3, 0.6), size=0.4)
    image, mask = render(spec)
    rows, cols = np.nonzero(mask)
    assert abs((cols.mean() + 0.5) / 64 - 0.3) < 0.01 and abs((rows.mean() + 0.5) / 64 - 0.6) < 0.01
    assert abs(mask.sum() / (np.pi * (0.2 * 64) ** 2) - 1) < 0.02  # area of a disc of radius 12.8 px
    assert tuple(image[38, 19]) == COLOURS["red"] and tuple(image[0, 0]) == COLOURS["blue"]
    blended = ~np.isin(image.reshape(-1, 3), np.array([COLOURS["red"], COLOURS["blue"]])).all(axis=1)
    assert 30 < blended.sum() < 200  # a one-pixel anti-aliased rim, not a hard edge and not a smear


@pytest.mark.parametrize("texture", ["stripes", "noise"])
def test_textures_keep_the_background_colour(texture):
    spec = ShapeSpec("square", "white", "green", texture, 0.3, (0.5, 0.5), texture_seed=4)
    image, _ = render(spec)  # the square spans rows 22–41
    offset = np.abs(image[:16].astype(float) - COLOURS["green"]).max(axis=2)
    assert 4 < offset.max() <= 0.04 * 255 + 1  # visible texture of at most the 0.04 amplitude
    assert read_background(image) == "green" and read_colour(image) == "white"


def test_every_shape_is_read_at_every_size_and_resolution():
    for resolution in (48, 64, 96):
        for shape in SHAPES:
            for size in (0.34, 0.50):
                image, mask = render(ShapeSpec(shape, "yellow", "purple", size=size, center=(0.4, 0.55)),
                                     resolution)
                assert read_shape(image) == shape, (resolution, shape, size)
                assert mask_iou(object_mask(image), mask) > 0.97


def test_sampled_specs_cover_the_vocabulary_and_stay_inside():
    generator = torch.Generator().manual_seed(0)
    specs = [sample_spec(generator) for _ in range(600)]
    assert {s.shape for s in specs} == set(SHAPES) and {s.texture for s in specs} == set(TEXTURES)
    assert {s.colour for s in specs} == set(COLOURS) == {s.background for s in specs}
    assert all(s.colour != s.background for s in specs)
    config = ToyConfig()
    for spec in specs:
        assert config.min_size <= spec.size <= config.max_size
        for coordinate in spec.center:
            assert config.margin - 1e-9 <= coordinate - spec.size / 2
            assert coordinate + spec.size / 2 <= 1 - config.margin + 1e-9


def test_numpy_and_torch_generators_are_deterministic():
    for make in (lambda: torch.Generator().manual_seed(5), lambda: np.random.default_rng(5)):
        first, second = make(), make()
        assert [sample_spec(first) for _ in range(5)] == [sample_spec(second) for _ in range(5)]
    with pytest.raises(ValueError, match="generator"):
        sample_spec(5)


def test_dataset_items_are_reproducible_alone_and_seed_dependent():
    dataset = ShapesDataset(10, seed=3)
    forward = [dataset[i] for i in range(10)]
    alone = ShapesDataset(10, seed=3)[7]
    assert torch.equal(alone["image"], forward[7]["image"]) and alone["caption"] == forward[7]["caption"]
    other = ShapesDataset(10, seed=4)
    assert sum(torch.equal(other[i]["image"], forward[i]["image"]) for i in range(10)) == 0
    assert len({item["spec"] for item in forward}) == 10
    with pytest.raises(IndexError):
        dataset[10]


def test_dataset_layout_and_collate():
    dataset = ShapesDataset(6, seed=0, size=32)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 32, 32) and batch["mask"].dtype == torch.bool
    assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1
    assert batch["caption"] == [caption(spec) for spec in batch["spec"]]
    item = dataset[1]  # the [-1, 1] torch layout reads like the uint8 numpy render
    image, _ = render(item["spec"], 32)
    assert read_colour(item["image"]) == read_colour(image) == item["spec"].colour
    assert read_background(item["image"]) == item["spec"].background
    assert read_shape(item["image"], item["mask"]) == item["spec"].shape  # torch mask accepted


def test_caption_words_are_single_clip_tokens_and_round_trip():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    assert all(len(tokenizer.encode(word)) == 1 for word in vocabulary())
    spec = sample_spec(torch.Generator().manual_seed(2))
    text = caption(spec)
    assert set(text.split()) <= set(vocabulary())
    assert parse_caption(text) == {"shape": spec.shape, "colour": spec.colour, "background": spec.background}
    assert parse_caption("a red circle") == {"shape": "circle", "colour": "red", "background": None}


def test_no_object_reads_as_none():
    generator = torch.Generator().manual_seed(0)
    for colour in COLOURS:
        flat = np.array(COLOURS[colour]) / 255 + 0.08 * torch.randn(64, 64, 3, generator=generator).numpy()
        read = read_attributes(np.clip(flat, 0, 1))
        assert read["shape"] is None and read["colour"] is None and not read["mask"].any()
        assert read["background"] == colour


def test_edit_pairs_keep_their_place():
    """What the editing tests rely on: a colour edit keeps the mask; a word swap circle -> square at one
    place overlaps with IoU above 0.7 (the templates' own IoU is pi/4)."""
    red, green, square = (render(spec_from_caption(text, center=(0.6, 0.4), size=0.4))[0] for text in
                          ("a red circle on a blue background", "a green circle on a blue background",
                           "a red square on a blue background"))
    assert mask_iou(object_mask(red), object_mask(green)) == 1.0
    assert read_colour(red) == "red" and read_colour(green) == "green"
    assert 0.75 < mask_iou(object_mask(red), object_mask(square)) < 0.82


def test_bad_input_raises_one_line_errors():
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeSpec("circle", "teal", "blue")
    with pytest.raises(ValueError, match="invisible"):
        ShapeSpec("circle", "blue", "blue")
    with pytest.raises(ValueError, match="names no background"):
        spec_from_caption("a red circle")
    with pytest.raises(ValueError, match="not of the form"):
        parse_caption("two red circles")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        read_attributes(np.zeros((3, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="max_size"):
        ToyConfig(min_size=0.5, max_size=0.3)
