"""editlab eval's metrics against torchmetrics or a hand computation on fixed inputs, and the benchmark readers."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from editing.evaluation.benchmarks import load_benchmark
from editing.evaluation.benchmarks.pie_bench import decode_mask, encode_mask, load_pie_bench
from editing.evaluation.benchmarks.toy_edits import ToyEdits
from editing.evaluation.metrics import pixels
from editing.evaluation.metrics.control import binary_f1
from editing.evaluation.report import bootstrap
from ldm.toy.readers import read_background, read_colour, read_shape
from tests.pie_bench_folder import write_pie_bench


@pytest.fixture
def pair():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=generator, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(3, 32, 32, generator=generator, dtype=torch.float64)).clamp(0, 1)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:20, 4:30] = True
    return a, b, mask


def test_background_mse_and_psnr_by_hand_and_the_compat_offset(pair):
    a, b, mask = pair
    keep = ~mask
    by_hand = ((a - b) ** 2)[:, keep].mean().item()  # mean over background pixels and channels
    clean = pixels.background_metrics(a, b, mask)
    assert clean["bg_mse"] == pytest.approx(by_hand, rel=1e-12)
    assert clean["bg_psnr"] == pytest.approx(10 * math.log10(1 / by_hand), rel=1e-12)
    compat = pixels.background_metrics(a, b, mask, compat=True)
    # PIE-Bench: MSE over the full frame of the masked images = clean MSE · N_bg / N; PSNR up by 10·log10(N / N_bg)
    assert compat["bg_mse"] == pytest.approx(by_hand * keep.sum().item() / keep.numel(), rel=1e-12)
    assert compat["bg_psnr"] - clean["bg_psnr"] == pytest.approx(10 * math.log10(keep.numel() / keep.sum().item()))


def test_compat_psnr_mse_ssim_equal_torchmetrics_on_the_masked_frame(pair):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b, mask = pair
    keep = (~mask).double()
    ma, mb = (a * keep)[None], (b * keep)[None]
    compat = pixels.background_metrics(a, b, mask, compat=True)
    # torchmetrics' PSNR rounds through float32 (log of a float32 constant): agreement to 1e-7 relative
    assert compat["bg_psnr"] == pytest.approx(peak_signal_noise_ratio(ma, mb, data_range=1.0).item(), rel=1e-6)
    assert compat["bg_mse"] == pytest.approx(F.mse_loss(ma, mb).item(), rel=1e-12)
    # same formula and padding in float64; summation order differs: equal up to rounding
    assert compat["bg_ssim"] == pytest.approx(structural_similarity_index_measure(ma, mb, data_range=1.0).item(),
                                              abs=1e-9)
    assert pixels.ssim(a, b) == pytest.approx(structural_similarity_index_measure(a[None], b[None],
                                                                                  data_range=1.0).item(), abs=1e-9)


def test_clean_ssim_averages_the_map_over_background_pixels(pair):
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b, mask = pair
    _, full = structural_similarity_index_measure(a[None], b[None], data_range=1.0, return_full_image=True)
    keep = ~mask
    assert pixels.background_metrics(a, b, mask)["bg_ssim"] == pytest.approx(full[0][:, keep].mean().item(), rel=1e-9)


def test_a_mask_over_everything_gives_no_background_number(pair):
    a, b, _ = pair
    values = pixels.background_metrics(a, b, torch.ones(32, 32, dtype=torch.bool))
    assert all(math.isnan(v) for v in values.values())


def test_canny_f1_equals_torchmetrics_binary_f1():
    from torchmetrics.functional.classification import binary_f1_score

    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(40, 40, generator=generator) > 0.8, torch.rand(40, 40, generator=generator) > 0.7
    assert binary_f1(a, b) == pytest.approx(binary_f1_score(a.flatten().int(), b.flatten().int()).item(), rel=1e-6)
    empty = torch.zeros(5, 5, dtype=torch.bool)
    assert binary_f1(empty, empty) == binary_f1_score(empty.flatten().int(), empty.flatten().int()).item() == 0


def test_lpips_with_a_user_backbone_file_equals_the_formula_by_hand(tmp_path, pair):
    import torchvision
    from torchmetrics.functional.image import lpips as tm_lpips

    from editing.evaluation.metrics.lpips import background_lpips, load_lpips, lpips_map

    torch.manual_seed(0)
    trunk = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(trunk.state_dict(), path)
    net = load_lpips(path)
    a, b, mask = pair[0].float(), pair[1].float(), pair[2]
    # by hand: d = Σ_l mean_hw Σ_c w_lc (f̂_l(x) − f̂_l(y))², f̂ unit length per pixel, torchvision's layers split
    # where LPIPS taps SqueezeNet, linear heads from the LPIPS v0.1 file torchmetrics ships
    heads = torch.load(__import__("os").path.join(__import__("os").path.dirname(tm_lpips.__file__),
                                                  "lpips_models", "squeeze.pth"), map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    x, y = ((2 * t[None] - 1 - shift) / scale for t in (a, b))
    bounds, total = [0, 2, 5, 8, 10, 11, 12, 13], 0.0
    with torch.no_grad():
        for layer in range(7):
            for i in range(bounds[layer], bounds[layer + 1]):
                x, y = trunk.features[i](x), trunk.features[i](y)
            nx, ny = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (x, y))
            weight = heads[f"lin{layer}.model.1.weight"]  # [1, C, 1, 1]
            total += float(F.conv2d((nx - ny) ** 2, weight).mean())
    assert float(lpips_map(net, a, b).mean()) == pytest.approx(total, rel=1e-3)  # upsampled map's mean
    compat = background_lpips(net, a, b, mask, compat=True)
    assert compat == pytest.approx(float(lpips_map(net, a * ~mask, b * ~mask).mean()), rel=1e-6)
    clean = background_lpips(net, a, b, mask)
    assert clean == pytest.approx(float(lpips_map(net, a, b)[~mask].mean()), rel=1e-6)


def _dino_file(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=32, embed_dim=128, depth=2, num_heads=2, num_classes=0)
    path = tmp_path / "dino_tiny.pth"
    torch.save({k: v for k, v in model.state_dict().items()}, path)
    return path, model.eval()


def test_structure_distance_equals_last_block_key_self_similarity_by_hand(tmp_path, pair):
    from editing.evaluation.metrics.dino import load_dino, resize_short_side, structure_distance

    path, reference = _dino_file(tmp_path)
    model = load_dino(path)
    a, b = pair[0].float(), pair[1].float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def keys(image, scale):
        x = (resize_short_side(image[None]) * scale - mean) / std
        with torch.no_grad():
            x = reference._pos_embed(reference.patch_embed(x))
            for block in reference.blocks[:-1]:
                x = block(x)
            qkv = reference.blocks[-1].attn.qkv(reference.blocks[-1].norm1(x))[0]  # [N, 3·D]
        return qkv[:, 128:256].double()  # the keys, heads side by side

    def distance(scale):
        sims = [F.cosine_similarity(k[:, None], k[None], dim=-1) for k in (keys(a, scale), keys(b, scale))]
        return float(((sims[0] - sims[1]) ** 2).mean())

    assert structure_distance(model, a, b) == pytest.approx(distance(1.0), rel=1e-5)
    # PIE-Bench's quirk: ImageNet normalisation applied to 0-255 values
    assert structure_distance(model, a, b, compat=True) == pytest.approx(distance(255.0), rel=1e-5)
    assert structure_distance(model, a, b, compat=True) != pytest.approx(structure_distance(model, a, b), rel=1e-3)


def test_clip_metrics_equal_open_clip_by_hand(tmp_path, pair):
    import open_clip
    from safetensors.torch import save_file

    from editing.evaluation.cases import EditCase
    from editing.evaluation.methods import MethodOutput
    from editing.evaluation.metrics import MetricSuite

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**config).eval()
    (tmp_path / "clip.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    a, b, mask = pair[0].float(), pair[1].float(), pair[2]
    case = EditCase("c", a, "a red circle", "a green circle", "make it green", mask=mask, target=b)
    results = {}
    for compat in (False, True):
        suite = MetricSuite(clip=tmp_path / "clip.safetensors", clip_config=tmp_path / "clip.json", compat=compat)
        suite.load()
        results[compat], _ = suite.score(case, MethodOutput(b))

    def image(x):
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        x = F.interpolate(x[None], size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
        with torch.no_grad():
            return F.normalize(clip.encode_image((x.clamp(0, 1) - mean) / std).double(), dim=-1)[0]

    with torch.no_grad():
        text = F.normalize(clip.encode_text(open_clip.tokenize(["a green circle", "a red circle"])).double(), dim=-1)
    out, src = image(b), image(a)
    clean = results[False]
    # the suite embeds images in one float32 batch, the reference one at a time: rounding differs (~1e-6)
    assert clean["clip_whole"] == pytest.approx(100 * max(float(out @ text[0]), 0), abs=1e-3)
    assert clean["clip_image"] == pytest.approx(float(out @ src), abs=1e-5)
    direction = F.cosine_similarity((out - src)[None], (text[0] - text[1])[None]).item()
    assert clean["clip_direction"] == pytest.approx(direction, abs=1e-5)
    assert clean["gt_clip_i"] == pytest.approx(1.0, abs=1e-6)  # the output is the ground truth
    # edit region: PIE-Bench scores the blacked full frame, the clean definition its bounding box (rows 8-19, 4-29)
    assert results[True]["clip_edited"] == pytest.approx(100 * max(float(image(b * mask) @ text[0]), 0), abs=1e-3)
    box = (b * mask)[:, 8:20, 4:30]
    assert clean["clip_edited"] == pytest.approx(100 * max(float(image(box) @ text[0]), 0), abs=1e-3)
    same = [k for k in clean if k not in ("clip_edited", "bg_mse", "bg_psnr", "bg_ssim")]
    assert all(clean[k] == results[True][k] for k in same)  # compat changes nothing else


def test_pie_bench_mask_decoder_reproduces_known_masks():
    side = 512
    runs = [3 * side + 10, 5, 100 * side + 200, 2 * side, side * side - 2, 10]  # the last run clipped at the end
    mask = decode_mask(runs)
    expected = np.zeros((side, side), dtype=bool)
    expected[3, 10:15] = True
    expected[100:102, 200:] = True
    expected[101, :] = True  # a run of 2·512 from (100, 200) wraps onto the next rows, row-major
    expected[102, :200] = True
    expected[-1, -2:] = True
    expected[[0, -1], :] = expected[:, [0, -1]] = True  # border forced to "edited"
    assert np.array_equal(mask, expected)
    inner = np.zeros((side, side), dtype=bool)
    inner[50:60, 70:90] = True
    assert np.array_equal(decode_mask(encode_mask(inner)), inner | decode_mask([]))
    with pytest.raises(ValueError, match="pairs"):
        decode_mask([1, 2, 3])


def test_pie_bench_reader_strips_brackets_and_rejects_malformed_files(tmp_path):
    write_pie_bench(tmp_path)
    (case,) = load_pie_bench(tmp_path)
    assert (case.source_prompt, case.target_prompt, case.words, case.kind) == ("a cat on a mat", "a dog on a mat",
                                                                                ("cat", "dog"), "1")
    assert case.mask.sum().item() == decode_mask([1000, 20]).sum()
    assert load_benchmark("pie-bench", tmp_path, categories=("1",))[0].id == "000000000000"
    with pytest.raises(ValueError, match="no cases"):
        load_pie_bench(tmp_path, ("2",))
    (tmp_path / "mapping_file.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pie_bench(tmp_path)
    (tmp_path / "mapping_file.json").write_text(json.dumps({"1": {"image_path": "x"}}))
    with pytest.raises(ValueError, match="lacks"):
        load_pie_bench(tmp_path)
    with pytest.raises(FileNotFoundError, match="mapping_file.json"):
        load_pie_bench(tmp_path / "elsewhere")


def test_toy_edits_are_seeded_balanced_and_exact():
    cases = ToyEdits(8, seed=3).cases()
    again = ToyEdits(8, seed=3).cases()
    assert [c.source_prompt for c in cases] == [c.source_prompt for c in again]
    assert all(torch.equal(c.target, d.target) for c, d in zip(cases, again))
    assert [c.kind for c in cases] == ["colour", "shape", "background", "texture"] * 2
    assert [c.id for c in ToyEdits(3, seed=3).cases()] == [c.id for c in cases[:3]]  # a prefix is the same set
    for case in cases:
        target = case.target.permute(1, 2, 0).numpy()
        assert read_background(target) == case.target_attributes["background"]
        assert read_colour(target) == case.target_attributes["colour"]
        assert read_shape(target) == case.target_attributes["shape"]
        changed = (case.target - case.image).abs().amax(0) > 0
        if case.kind in ("background", "texture"):  # the object's interior (its anti-aliased rim blends) is kept
            inner = -F.max_pool2d(-case.target_object_mask.float()[None, None], 3, 1, 1)[0, 0] > 0  # eroded
            assert inner.any() and not (changed & inner).any()
        assert case.words[1] in case.target_prompt.split() and case.mask.any()


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.1, 0.4, 0.35, 0.8, 0.2, 0.5]
    mean, low, high = bootstrap(values)
    assert mean == pytest.approx(np.mean(values)) and low < mean < high
    assert bootstrap(values) == (mean, low, high)
    assert bootstrap([2.0, 2.0]) == (2.0, 2.0, 2.0)
