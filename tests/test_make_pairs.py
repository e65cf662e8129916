"""editing/instruct_pix2pix (pairs, toy_pairs) and `editlab make-pairs`: the CLIP filters against hand computations,
the draws, the injected-step rule, the per-item injection hook, the self-attention injection on the toy model
(before row = plain generation; p = 0 gives the plain after-caption image, p = 1 pulls the after image towards
the before image), a batch equal to its items rendered one at a time, the toy filter on rendered ground-truth
images, the toy caption pairs, and the command end to end (a tiny random open_clip CLIP, or --filter toy),
its output read by train-ip2p's PairFolder."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from editing.cli import main
from editing.instruct_pix2pix.data import PairFolder
from editing.instruct_pix2pix.pairs import (SCORES, PairInjection, PairItem, PairRecipe, SampleDraw, clip_scores,
                                            draw_samples, injected_steps, passes_filters, render_pair, render_pairs,
                                            select_samples)
from editing.instruct_pix2pix.toy_pairs import ToyFilter, toy_caption_pairs
from editing.options import TOY_WEIGHTS
from ldm.hooks import Attachment
from ldm.images import read_parameters
from ldm.model import StableDiffusion
from ldm.pipeline import decode_latents, text_to_image
from ldm.toy.shapes import parse_caption, render, spec_from_caption

TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
BEFORE, AFTER = "a red circle on a blue background", "a green square on a blue background"


# ------------------------------------------------------------------------------------------- CLIP filters


def test_clip_scores_match_a_hand_computation():
    # ê_0 = (0.6, 0.8), ê_1 = (1, 0), t̂_0 = (0, 1), t̂_1 = (1, 1)/√2 after normalising these embeddings
    e0, e1, t0, t1 = (torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]]),
                      torch.tensor([[1.0, 1.0]]))
    r = 1 / math.sqrt(2)
    d_img, d_txt = (1 - 0.6, 0 - 0.8), (r - 0, r - 1)  # ê_1 − ê_0, t̂_1 − t̂_0
    direction = (d_img[0] * d_txt[0] + d_img[1] * d_txt[1]) / (math.hypot(*d_img) * math.hypot(*d_txt))
    expected = {"image_text_before": 0.8, "image_text_after": r, "image_image": 0.6, "direction": direction}
    scores = clip_scores(e0, e1, t0, t1)
    assert set(scores) == set(SCORES)
    for name, value in expected.items():
        assert scores[name].item() == pytest.approx(value, abs=1e-6), name
    assert direction == pytest.approx(0.75545, abs=1e-4)
    # the direction is taken between normalised embeddings: rescaling one embedding changes nothing
    rescaled = clip_scores(e0 * 7, e1, t0, t1 * 0.1)
    assert all(torch.allclose(rescaled[k], scores[k], atol=1e-6) for k in SCORES)


def test_filters_and_ranking_by_direction_keep_at_most_k():
    scores = {"image_text_before": torch.tensor([0.30, 0.30, 0.10, 0.30, 0.30]),
              "image_text_after": torch.tensor([0.30, 0.25, 0.30, 0.30, 0.30]),
              "image_image": torch.tensor([0.80, 0.90, 0.90, 0.72, 0.95]),
              "direction": torch.tensor([0.25, 0.40, 0.90, 0.90, 0.30])}
    paper = PairRecipe(keep=2)
    # sample 2 fails image-text (0.10), sample 3 fails image-image (0.72 < 0.75)
    assert passes_filters(scores, paper).tolist() == [True, True, False, False, True]
    assert select_samples(scores, paper) == [1, 4]  # directions 0.40, 0.30 (0.25 is the third)
    script = PairRecipe(keep=2, min_image_image=0.7)  # the public script's 0.7 admits sample 3
    assert select_samples(scores, script) == [3, 1]
    assert select_samples(scores, PairRecipe(keep=4, min_direction=0.35)) == [1]
    assert select_samples(scores, PairRecipe(min_direction=1.01)) == []


# ------------------------------------------------------------------------------------- draws and schedule


def test_draws_are_reproducible_and_in_range():
    recipe = PairRecipe(samples=50, seed=3)
    draws = draw_samples(recipe, 0)
    assert draws == draw_samples(recipe, 0)
    assert draws != draw_samples(recipe, 1) and draws != draw_samples(PairRecipe(samples=50, seed=4), 0)
    assert all(0.1 <= d.p <= 0.9 and 7.5 <= d.guidance <= 15.0 for d in draws)
    assert len({d.seed for d in draws}) == 50
    ps = torch.tensor([d.p for d in draws])
    assert ps.min() < 0.3 and ps.max() > 0.7  # spread over the range, not a constant
    fixed = draw_samples(PairRecipe(samples=3, p_range=(0.4, 0.4), guidance_range=(9.0, 9.0)), 0)
    assert [(d.p, d.guidance) for d in fixed] == [(0.4, 9.0)] * 3


def test_injected_steps_follow_the_reference_rule():
    # step i is injected when i / (N − 1) < p
    assert injected_steps(0.5, 5) == range(2)  # 0/4, 1/4 < 0.5; 2/4 is not
    assert injected_steps(0.51, 5) == range(3)
    assert injected_steps(1.0, 5) == range(4) and injected_steps(0.0, 5) == range(0)
    assert injected_steps(0.3, 1) == range(1)
    with pytest.raises(ValueError, match="p range"):
        PairRecipe(p_range=(0.9, 0.1))


def test_pair_injection_copies_each_items_before_map_in_its_own_window():
    hook = PairInjection([1, 0, 2])  # item 0 injected at step 0, item 1 never, item 2 at steps 0 and 1
    self_layer = SimpleNamespace(kind="self", level=0, name="down.0.0.self")
    cross_layer = SimpleNamespace(kind="cross", level=0, name="down.0.0.cross")
    hook.begin_step(0, 999)
    assert hook.wants_probabilities(self_layer) and not hook.wants_probabilities(cross_layer)
    assert hook.map_sources(self_layer, 12).tolist() == [0, 0, 2, 3, 4, 4, 6, 6, 8, 9, 10, 10]  # after_j ← before_j
    assert hook.map_sources(cross_layer, 12) is None
    hook.begin_step(1, 500)
    assert hook.map_sources(self_layer, 12).tolist() == [0, 1, 2, 3, 4, 4, 6, 7, 8, 9, 10, 10]
    assert hook.map_sources(self_layer, 6).tolist() == [0, 1, 2, 3, 4, 4]  # unguided: the conditional rows
    hook.begin_step(2, 100)  # past every window: the identity, so every step runs the same kernel
    assert hook.map_sources(self_layer, 12).tolist() == list(range(12))
    with pytest.raises(ValueError, match="batch of 5 rows for 6 prompts"):
        hook.map_sources(self_layer, 5)
    layers = [SimpleNamespace(calls=0) for _ in range(3)]
    hook.attachment = Attachment(layers)
    layers[0].calls += 1
    layers[1].calls += 1  # a layer the hook never reached
    with pytest.raises(RuntimeError, match="saw 2 attention layers in step 2, expected 3"):
        hook.end_step(2, 100, None)


# ----------------------------------------------------------------------------------- toy model rendering


@pytest.fixture(scope="module")
def toy():
    return StableDiffusion.load(TOY_WEIGHTS).eval()


def test_injection_fraction_changes_only_the_after_image(toy):
    recipe = PairRecipe(steps=4, height=64, width=64)
    none, full = (render_pair(toy, BEFORE, AFTER, SampleDraw(5, p, 8.0), recipe) for p in (0.0, 1.0))
    plain_before, plain_after = (text_to_image(toy, [caption], recipe.sampling(5, 8.0), progress=False)[0]
                                 for caption in (BEFORE, AFTER))
    # the before row is the plain generation with the same noise (batch and kernel differ: rounding only)
    for rows in (none, full):
        assert (rows[0] - plain_before).abs().max() < 1e-3
    assert (none[1] - plain_after).abs().max() < 1e-3  # p = 0: no injection at all
    assert (full[1] - plain_after).abs().max() > 0.1  # p = 1: the after image changes ...
    assert (full[1] - full[0]).abs().mean() < (none[1] - none[0]).abs().mean()  # ... towards the before image


def test_a_batch_equals_its_items_rendered_one_at_a_time(toy):
    # euler-a draws noise at every step: each item's two rows must draw it from the item's own seed
    recipe = PairRecipe(steps=3, height=64, width=64, scheduler="euler-a")
    items = [PairItem(BEFORE, AFTER, SampleDraw(5, 0.6, 8.0)),
             PairItem("a yellow square on a white background", "a yellow cross on a white background",
                      SampleDraw(11, 0.2, 12.5)),
             PairItem(BEFORE, "a red circle on a purple background", SampleDraw(3, 1.0, 9.0))]
    batch = render_pairs(toy, items, recipe)
    alone = torch.cat([render_pair(toy, item.before, item.after, item.draw, recipe) for item in items])
    assert batch.shape == (6, 4, 16, 16)
    # Not bit for bit: a 6-row batch may run other kernel blockings than a 2-row one (oneDNN/MKL choose by shape,
    # and torch releases change the choice); ~1e-7 relative per operation, grown by 3 guided steps (2e-4 seen).
    assert (batch - alone).abs().max() <= 2e-4 * alone.abs().max()
    assert (batch[0] - batch[4]).abs().max() > 0.1  # same caption, other seed: other noise
    # What make-pairs promises whatever --batch: the same verdicts, and saved 8-bit images within one level
    # (rounding to 8 bits can put two nearly equal values on either side of a level).
    images = [decode_latents(toy, latents) for latents in (batch, alone)]
    levels = [(image * 255).round() for image in images]
    assert (levels[0] - levels[1]).abs().max() <= 1
    verdicts = [[ToyFilter(min_iou=0.3).scores(item.before, item.after, image[2 * k:2 * k + 2])
                 for k, item in enumerate(items)] for image in images]
    for mine, theirs in zip(*verdicts):
        assert mine["passes"] == theirs["passes"] and abs(mine["iou"] - theirs["iou"]) <= 0.02
        assert {k: v for k, v in mine.items() if k != "iou"} == {k: v for k, v in theirs.items() if k != "iou"}


# ------------------------------------------------------------------------------------------- toy filter


def as_images(*specs):
    """Rendered ground truth [N, 3, H, W] in [0, 1], as decode_latents returns images."""
    return torch.stack([torch.from_numpy(render(spec)[0]).permute(2, 0, 1).float() / 255 for spec in specs])


def test_toy_filter_reads_the_captions_and_the_mask_iou():
    toy_filter = ToyFilter(min_iou=0.7, keep=4)
    before = spec_from_caption(BEFORE, center=(0.45, 0.5))
    green = "a green circle on a blue background"
    right = toy_filter.scores(BEFORE, green, as_images(before, spec_from_caption(green, center=(0.45, 0.5))))
    assert right["passes"] and right["iou"] > 0.95
    assert (right["before_colour"], right["before_shape"], right["before_background"]) == ("red", "circle", "blue")
    assert (right["after_colour"], right["after_shape"], right["after_background"]) == ("green", "circle", "blue")
    wrong_colour = toy_filter.scores(BEFORE, green, as_images(before, spec_from_caption(
        "a yellow circle on a blue background", center=(0.45, 0.5))))
    assert wrong_colour["after_colour"] == "yellow" and not wrong_colour["passes"]
    moved = toy_filter.scores(BEFORE, green, as_images(before, spec_from_caption(green, center=(0.7, 0.5))))
    assert moved["after_colour"] == "green" and moved["iou"] < 0.7 and not moved["passes"]
    assert toy_filter.select([wrong_colour, moved, right]) == [2]
    # a shape edit changes the mask itself: no IoU bound, but the shape must read as the caption
    square = "a red square on a blue background"
    reshaped = toy_filter.scores(BEFORE, square, as_images(before, spec_from_caption(square, center=(0.45, 0.5))))
    assert reshaped["after_shape"] == "square" and reshaped["passes"] and reshaped["iou"] < 1.0
    assert toy_filter.select([reshaped, moved, right]) == [2, 0]  # by IoU, largest first
    assert ToyFilter(keep=1).select([reshaped, moved, right]) == [2]
    with pytest.raises(ValueError, match="--filter toy reads toy captions only"):
        toy_filter.scores("a photo of a cat", green, as_images(before, before))


def test_toy_caption_pairs_are_seeded_one_edit_each():
    rows = toy_caption_pairs(60, seed=2)
    assert rows == toy_caption_pairs(60, seed=2) and rows != toy_caption_pairs(60, seed=3)
    assert toy_caption_pairs(10, seed=2) == rows[:10]  # pair i depends only on (seed, i)
    kinds = set()
    for row in rows:
        assert set(row) == {"input", "edit", "output"}
        before, after = parse_caption(row["input"]), parse_caption(row["output"])
        changed = [name for name in before if before[name] != after[name]]
        assert len(changed) == 1 and after[changed[0]] in row["edit"]
        kinds.add(changed[0])
    assert kinds == {"colour", "shape", "background"}
    with pytest.raises(ValueError, match="at least 1"):
        toy_caption_pairs(0)


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("make-pairs")
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**TINY_CLIP).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "clip.safetensors"))
    (folder / "clip.json").write_text(json.dumps(TINY_CLIP))
    captions = [{"input": BEFORE, "edit": "make it a green square", "output": AFTER},
                {"input": "a yellow triangle on a purple background", "edit": "make the background white",
                 "output": "a yellow triangle on a white background"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return folder


def make_pairs(files, out, *extra):
    return main(["make-pairs", "--captions", str(files / "captions.jsonl"), "--clip", str(files / "clip.safetensors"),
                 "--clip-config", str(files / "clip.json"), "--out", str(out), "--samples", "2", "--steps", "3",
                 "--seed", "7", *extra])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_pairs_keeps_and_rejects_and_train_ip2p_reads_the_folder(files, tmp_path, capsys):
    permissive = ["--min-image-text", "-1", "--min-image-image", "-1", "--min-direction", "-1"]
    assert make_pairs(files, tmp_path / "all", "--keep", "1", *permissive) == 0
    pairs, samples = read_jsonl(tmp_path / "all/pairs.jsonl"), read_jsonl(tmp_path / "all/samples.jsonl")
    assert len(samples) == 4 and len(pairs) == 2  # K = 1 of 2 samples for each of 2 caption pairs
    for index in (0, 1):
        mine = [s for s in samples if s["caption_index"] == index]
        best = max(mine, key=lambda s: s["direction"])
        kept = [p for p in pairs if p["caption_index"] == index]
        assert len(kept) == 1 and kept[0]["seed"] == best["seed"] and kept[0]["rank"] == 0
        assert all(0.1 <= s["p"] <= 0.9 and 7.5 <= s["guidance"] <= 15 for s in mine)
    assert pairs[1]["instruction"] == "make the background white"
    metadata = read_parameters(tmp_path / "all" / pairs[0]["after"])
    assert metadata["row"] == 1 and metadata["p"] == pairs[0]["p"] and metadata["direction"] == pairs[0]["direction"]
    folder = PairFolder(tmp_path / "all", 64)
    assert len(folder) == 2 and folder[0]["before"].shape == (3, 64, 64)
    assert not torch.equal(folder[0]["before"], folder[0]["after"])
    assert "kept 1 of 2 samples" in capsys.readouterr().out

    assert make_pairs(files, tmp_path / "none", "--min-direction", "1.5") == 1  # cos ≤ 1: nothing passes
    assert "no sample passed the CLIP filters" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "none/pairs.jsonl") == []
    rejected = read_jsonl(tmp_path / "none/samples.jsonl")
    assert [s["rank"] for s in rejected] == [None] * 4
    assert [(s["seed"], s["direction"]) for s in rejected] == [(s["seed"], s["direction"]) for s in samples]

    assert make_pairs(files, tmp_path / "all") == 2  # another run's output is refused
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"input": "a", "output": "b"}', "captions.jsonl:2: missing or empty 'edit'"),
    ("not json", "captions.jsonl:2: not JSON"),
    ('["a", "b"]', "captions.jsonl:2: not a JSON object")])
def test_bad_caption_lines_are_one_line_errors(files, tmp_path, capsys, line, message):
    good = (files / "captions.jsonl").read_text().splitlines()[0]
    (tmp_path / "captions.jsonl").write_text(good + "\n" + line + "\n")
    argv = ["make-pairs", "--captions", str(tmp_path / "captions.jsonl"), "--clip", str(files / "clip.safetensors"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_files_are_one_line_errors(files, tmp_path, capsys):
    base = ["make-pairs", "--out", str(tmp_path / "out")]
    assert main(base + ["--captions", str(tmp_path / "nope.jsonl"), "--clip", str(files / "clip.safetensors")]) == 2
    assert "no such captions file" in capsys.readouterr().err
    assert main(base + ["--captions", str(files / "captions.jsonl"), "--clip", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such CLIP weights file" in capsys.readouterr().err


def test_an_instruct_pix2pix_model_is_refused(files, tmp_path, capsys):
    from ldm.config import tiny_sd1

    StableDiffusion(tiny_sd1(8)).save(tmp_path / "ip2p.safetensors")
    assert make_pairs(files, tmp_path / "out", "--weights", str(tmp_path / "ip2p.safetensors")) == 2
    assert "8-channel UNet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="guidance range"):
        PairRecipe(guidance_range=(15.0, 7.5))
    with pytest.raises(ValueError, match="straddles 1"):  # w ≤ 1 and w > 1 cannot share a CFG batch
        PairRecipe(guidance_range=(0.5, 7.5))


def test_make_pairs_with_toy_captions_and_the_toy_filter(tmp_path, capsys, weights):
    out = tmp_path / "toy"
    code = main(["make-pairs", "--toy-captions", "3", "--filter", "toy", "--samples", "2", "--keep", "1",
                 "--steps", "3", "--scheduler", "ddim", "--seed", "1", "--batch", "4", "--out", str(out)])
    samples, pairs = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "pairs.jsonl")
    captions = toy_caption_pairs(3, seed=1)
    assert [s["output"] for s in samples] == [c["output"] for c in captions for _ in range(2)]
    for index in range(3):
        mine = [s for s in samples if s["caption_index"] == index]
        for s in mine:  # the recorded verdict follows from the recorded reads
            words = [parse_caption(s["input"]), parse_caption(s["output"])]
            reads_right = all(s[f"{row}_{name}"] == w[name] for row, w in zip(("before", "after"), words) for name in w)
            assert 0.0 <= s["iou"] <= 1.0
            assert s["passes"] == (reads_right and (words[0]["shape"] != words[1]["shape"] or s["iou"] >= 0.7))
        passing = [s for s in mine if s["passes"]]
        kept = [s for s in mine if s["rank"] is not None]
        assert len(kept) == min(1, len(passing))
        assert not kept or kept[0]["iou"] == max(s["iou"] for s in passing)
    assert len(pairs) == sum(s["rank"] is not None for s in samples) and code == (0 if pairs else 1)
    if pairs:
        assert len(PairFolder(out, 64)) == len(pairs) and pairs[0]["instruction"] == captions[pairs[0]["caption_index"]]["edit"]
    else:
        assert "no sample passed the toy filters" in capsys.readouterr().err

    # --filter clip without --clip: the toy CLIP with the toy model (tests/test_toy_cli.py), an error otherwise
    assert main(["make-pairs", "--weights", str(weights), "--toy-captions", "2", "--out", str(tmp_path / "clip")]) == 2
    err = capsys.readouterr().err
    assert "--clip is needed" in err and len(err.strip().splitlines()) == 1
