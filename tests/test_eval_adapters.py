"""editlab eval's conditioned and learned methods on two toy-edits cases (a colour and a shape edit): ControlNet
with a Canny and a mask hint made from the case, IP-Adapter and InstantStyle with the case's source as the
style image (the bundled toy IP-Adapter and toy CLIP, no file given), and Visii learned from the case's pair;
each row's metrics are recomputed by hand from the PNG it wrote. A case a method cannot run says why in its row.

The toy world has no trained ControlNet: the test makes one from the toy UNet (the training start) with its hint
encoder and zero convolutions drawn at random, so that the hint reaches the UNet; its outputs are meaningless,
its metrics are not.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import BinaryF1Score

from controls import ControlNet
from controls.canny import canny
from editing.cli import main
from editing.evaluation.benchmarks.toy_edits import ToyEdits
from editing.options import TOY_CLIP_WEIGHTS, TOY_IP_ADAPTER_WEIGHTS, TOY_WEIGHTS
from ldm.clip_models import clip_image_features, clip_text_features, load_clip
from ldm.model import StableDiffusion
from ldm.toy.readers import object_mask
from tests.peers import randomize_
from tests.pie_bench_folder import write_pie_bench

pytestmark = pytest.mark.skipif(not (TOY_CLIP_WEIGHTS.is_file() and TOY_IP_ADAPTER_WEIGHTS.is_file()),
                                reason="toy CLIP / IP-Adapter weights not built")
STEPS = "4"
PIXEL = 1 / 255  # the PNG holds the output rounded to 8 bits: a mean over pixels moves by at most half of this


def random_toy_controlnet(path):
    """The toy UNet's encoder as a ControlNet (toy VAE: 4× down, so a 3-level hint encoder) with its hint encoder
    and zero convolutions drawn at random: untrained, but the hint changes the UNet's residuals."""
    net = ControlNet.from_unet(StableDiffusion.load(TOY_WEIGHTS).unet, (8, 16, 32))
    with torch.no_grad():
        for seed, module in enumerate([net.controlnet_cond_embedding, net.controlnet_down_blocks,
                                       net.controlnet_mid_block]):
            randomize_(module, seed)
        # five SiLU convolutions at 1/√fan_in scale shrink the hint's features about 30×: restore them
        net.controlnet_cond_embedding.conv_out.weight *= 30
    net.save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    random_toy_controlnet(folder / "cn.safetensors")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the conftest sets one thread only after module fixtures
    try:
        assert main(["eval", "--benchmark", "toy-edits", "--cases", "2", "--kinds", "colour,shape",
                     "--method", "controlnet", "--method", "ip-adapter", "--method", "instant-style",
                     "--method", "visii", "--controlnet", str(folder / "cn.safetensors"),
                     "--sweep", "controlnet.hint=canny,mask", "--sweep", f"controlnet.steps={STEPS}",
                     "--sweep", f"ip-adapter.steps={STEPS}", "--sweep", f"instant-style.steps={STEPS}",
                     "--sweep", "visii.train_steps=3", "--sweep", f"visii.steps={STEPS}",
                     "--out", str(folder / "out")]) == 0
    finally:
        torch.set_num_threads(previous)
    out = folder / "out"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, {case.id: case for case in ToyEdits(2, kinds=("colour", "shape")).cases()}


def output_of(out, row) -> torch.Tensor:
    array = np.array(Image.open(out / row["image"]).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255  # [H, W, 3] uint8 -> [3, H, W] in [0, 1]


def rows_of(rows, method, **setting):
    return [r for r in rows if r["method"] == method and all(r["setting"].get(k) == v for k, v in setting.items())]


def test_every_row_runs(run):
    _, rows, _ = run
    assert len(rows) == 2 * 5 and all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]


def test_controlnet_condition_fidelity_equals_torchmetrics_and_the_readers(run):
    out, rows, cases = run
    for row in rows_of(rows, "controlnet"):
        case, image = cases[row["case"]], output_of(out, row)
        # the hint's object mask read back from the output: IoU by hand (8-bit rounding may move one edge pixel)
        read = torch.from_numpy(object_mask(image.permute(1, 2, 0).double().numpy()))
        hint = case.source_object_mask
        iou = (read & hint).sum().item() / max((read | hint).sum().item(), 1)
        assert row["metrics"]["hint_iou"] == pytest.approx(iou, abs=0.02)
        assert 0 <= row["metrics"]["hint_iou"] <= 1
        if row["setting"]["hint"] == "canny":
            # Canny quantises to 8 bits as the PNG does, so the F1 is recomputed exactly (torchmetrics' F1)
            edges, hint_edges = canny(image), canny(case.image)
            f1 = BinaryF1Score()(edges.flatten().int(), hint_edges.flatten().int()).item()
            assert row["metrics"]["canny_f1"] == pytest.approx(f1, abs=1e-6)
            assert 0 <= f1 <= 1 and hint_edges.sum() > 20  # the source's outline is the hint
        else:
            assert "canny_f1" not in row["metrics"] and "canny_f1" not in row["not_computed"]
    for case_id in cases:  # the hint reaches the UNet: edges and mask give different images
        canny_row, mask_row = [r for r in rows_of(rows, "controlnet") if r["case"] == case_id]
        assert (output_of(out, canny_row) - output_of(out, mask_row)).abs().mean() > 0.01


def test_style_scores_equal_the_toy_clip_by_hand(run):
    out, rows, cases = run
    clip = load_clip(TOY_CLIP_WEIGHTS, None, text_tower=True)
    outputs = {}
    for method in ("ip-adapter", "instant-style"):
        for row in rows_of(rows, method):
            case, image = cases[row["case"]], output_of(out, row)
            with torch.no_grad():
                e_out, e_style = torch.nn.functional.normalize(
                    clip_image_features(clip, torch.stack([image, case.image])).double(), dim=-1)  # style=source
                e_text = torch.nn.functional.normalize(clip_text_features(clip, [case.target_prompt]).double(),
                                                       dim=-1)[0]
            # the row scored the unrounded output; the PNG moves each pixel by < 1/510
            assert row["metrics"]["style_clip_i"] == pytest.approx(float(e_out @ e_style), abs=0.01)
            assert row["metrics"]["style_clip_t"] == pytest.approx(100 * max(float(e_out @ e_text), 0), abs=1.0)
            assert -1 <= row["metrics"]["style_clip_i"] <= 1 and 0 <= row["metrics"]["style_clip_t"] <= 100
            outputs[method, row["case"]] = image
    for case_id in cases:  # InstantStyle injects into fewer layers than IP-Adapter: not the same image
        assert (outputs["ip-adapter", case_id] - outputs["instant-style", case_id]).abs().mean() > 1e-3


def test_visii_learned_from_the_pair_scores_against_the_ground_truth(run):
    out, rows, cases = run
    for row in rows_of(rows, "visii"):
        case, image = cases[row["case"]], output_of(out, row)
        assert row["metrics"]["gt_l1"] == pytest.approx((image - case.target).abs().mean().item(), abs=PIXEL / 2)
        assert row["metrics"]["gt_l2"] == pytest.approx(((image - case.target) ** 2).mean().item(), abs=PIXEL)
        assert 0 < row["metrics"]["gt_l1"] < 1 and row["metrics"]["edit_accuracy"] in (0.0, 1.0)


def test_a_case_a_method_cannot_run_says_why_in_its_row(tmp_path):
    root = write_pie_bench(tmp_path / "pie", ".png")
    assert main(["eval", "--benchmark", "pie-bench", "--root", str(root), "--method", "visii",
                 "--method", "controlnet", "--sweep", "controlnet.hint=canny,mask", "--method", "ip-adapter",
                 "--sweep", "ip-adapter.style=target", "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["cannot-run"] * 4 and all(not r["metrics"] for r in rows)
    assert "no ground-truth image" in rows[0]["reason"]
    assert "needs a ControlNet" in rows[1]["reason"] and "--controlnet FILE" in rows[1]["reason"]
    assert "only toy-edits cases" in rows[2]["reason"]
    assert "style=target needs the case's ground-truth image" in rows[3]["reason"]
