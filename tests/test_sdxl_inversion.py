"""Inversions on a tiny SDXL model (a random diffusers SDXL folder converted by weights_convert) against diffusers.

Edit-friendly DDPM inversion against ``LEditsPPPipelineStableDiffusionXL`` (``invert`` with DDIM, and its
``__call__`` set up to be plain classifier-free guidance), as the SD 1.x comparison in
tests/test_ddpm_inversion.py: the same weights, DDIM config, image, grid (skip 0), auxiliary noise draws. Where
that pipeline departs from the method (docs/methods.md §4.4) the test copies the departure into editlab's
inputs (the transposed size conditioning of a non-square image) or turns it off (the last three maps zeroed).

DDIM inversion against diffusers' ``DDIMInverseScheduler`` run inside ``StableDiffusionXLPipeline`` (the
scheduler steps towards the larger t, the pipeline supplies the SDXL conditioning). Null-text inversion
(docs/methods.md §3.4) against DDIM inversion on a tiny SDXL model made to behave like a trained one, and
Prompt-to-Prompt on a real image through ``editlab p2p --image``. P2P's attention levels on SDXL.
"""

import numpy as np
import pytest
import torch

from editing.ddpm_edit.editor import DDPMEditConfig, edit_inversion, reconstruct
from inversion.ddpm_noise import DDPMInversionConfig, invert
from ldm.config import tiny_sdxl
from ldm.model import StableDiffusion
from ldm.pipeline import encode_images
from ldm.sdxl import MicroConditioning
from tests.peers import relative_error
from tests.peers_sdxl import make_sdxl_folder
from weights_convert import convert

SOURCE, TARGET = "a cat sitting on a mat", "a dog sitting on a mat"
STEPS = 6


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-inversion")
    pipe = make_sdxl_folder(tiny_sdxl(), folder / "diffusers", seed=5)
    convert(folder / "diffusers", folder / "model.safetensors")
    return StableDiffusion.load(folder / "model.safetensors"), pipe, folder / "model.safetensors"


def _image(height=32, width=64, seed=1):  # LEDITS++ wants sides that are multiples of 32
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _read(path) -> torch.Tensor:
    from ldm.images import read_rgb

    return torch.from_numpy(np.asarray(read_rgb(path), dtype=np.float32) / 255).permute(2, 0, 1)  # -> [3, H, W]


def _ledits_xl(pipe, monkeypatch):
    """LEditsPPPipelineStableDiffusionXL on the folder's weights with SD's DDIM config, and a spy on its noise
    computation (``invert`` keeps the corrected latents x_p = μ + σz only for the last step)."""
    from diffusers import LEditsPPPipelineStableDiffusionXL
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion_xl as ledits

    from editing.bench.peers import diffusers_scheduler

    parts = {k: v for k, v in pipe.components.items() if k not in ("scheduler", "image_encoder", "feature_extractor")}
    xl = LEditsPPPipelineStableDiffusionXL(**parts, scheduler=diffusers_scheduler("ddim", "epsilon"),
                                           add_watermarker=False)
    xl.set_progress_bar_config(disable=True)
    corrected = []
    compute_noise = ledits.compute_noise

    def spy(*args):
        z, x_prev = compute_noise(*args)
        corrected.append(x_prev.clone())
        return z, x_prev

    monkeypatch.setattr(ledits, "compute_noise", spy)
    return xl, corrected


@torch.no_grad()
def test_ddpm_inversion_and_edit_match_ledits_pp_xl(sdxl, monkeypatch):
    """Noise maps, latents and a CFG edit equal to LEDITS++ XL with its size conditioning transposed (see
    below); with editlab's (H, W) order they differ. z = (x_p − μ)/σ divides UNet rounding (~1e-6) by σ (down
    to 0.06 on this 6-step grid), so maps are compared relative to their size, as for SD 1.x."""
    model, pipe, _ = sdxl
    image = _image()
    xl, corrected = _ledits_xl(pipe, monkeypatch)
    xl.invert(image, source_prompt=SOURCE, source_guidance_scale=3.5, num_inversion_steps=STEPS, skip=0.0,
              num_zero_noise_steps=0, generator=torch.Generator().manual_seed(0))
    x0 = encode_images(model, image)
    # LEDITS++ XL 0.42 reads the latent height as the width: it conditions on (W, H) for an H × W image
    swapped = MicroConditioning(original_size=(64, 32), target_size=(64, 32))
    assert xl.size == (64, 32)
    ours = invert(model, x0, SOURCE, DDPMInversionConfig(steps=STEPS), torch.Generator().manual_seed(0),
                  micro=swapped)
    assert xl.inversion_steps.tolist() == ours.timesteps.tolist() == [166 * k + 1 for k in reversed(range(STEPS))]
    assert relative_error(xl.init_latents, ours.latents[0]) <= 1e-6  # x_T: the same draw, the same formula
    theirs = torch.stack(corrected)  # smallest t last, as ours
    assert relative_error(theirs, ours.latents[1:]) <= 1e-5  # measured 2e-7: the same sums in another module
    assert relative_error(xl.zs, ours.noise_maps) <= 1e-5  # measured 4e-6
    assert ours.noise_maps[-1].abs().mean() > 0.1  # z_1 kept

    # the edit: LEDITS++'s edit term with threshold 0 (every pixel kept) and no warm-up is CFG towards TARGET
    edited = xl(editing_prompt=[TARGET], edit_guidance_scale=6.0, edit_threshold=0.0, edit_warmup_steps=0,
                output_type="latent").images
    ours_edit = edit_inversion(model, ours, TARGET, DDPMEditConfig(skip=0, target_guidance=6.0))
    # measured 8e-6: six regenerated steps, each adding σ_t z_t, with z_t carrying the rounding of the
    # inversion divided by σ_t
    assert relative_error(edited, ours_edit) <= 5e-5
    assert (reconstruct(model, ours) - x0).abs().max() <= 1e-5 * x0.abs().max()  # exact, last map included

    # editlab's own order (H, W), the size SDXL was trained to read, gives other maps on a non-square image
    right = invert(model, x0, SOURCE, DDPMInversionConfig(steps=STEPS), torch.Generator().manual_seed(0))
    assert relative_error(ours.noise_maps, right.noise_maps) > 1e-3


def test_ddpm_edit_command_on_sdxl(sdxl, tmp_path):
    """``editlab ddpm-edit`` on SDXL weights (plain and with P2P): the PNG is the API's edit, and records the
    micro-conditioning that both the inversion and the edit used."""
    from editing.cli import main
    from editing.ddpm_edit.editor import ddpm_invert_image
    from ldm.images import read_parameters, save_png
    from ldm.pipeline import decode_latents

    model, _, path = sdxl
    save_png(tmp_path / "in.png", _image(32, 48)[0], {"test": "input"})
    image = _read(tmp_path / "in.png")[None]  # the pixels the command reads
    args = ["ddpm-edit", "--weights", str(path), "--image", str(tmp_path / "in.png"), "--source-prompt", SOURCE,
            "--target-prompt", TARGET, "--steps", "4", "--skip", "1", "--crop-top-left", "4", "8"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    micro = MicroConditioning(crop_top_left=(4, 8))
    inversion = ddpm_invert_image(model, image, SOURCE, DDPMInversionConfig(steps=4), micro=micro)
    expected = decode_latents(model, edit_inversion(model, inversion, TARGET, DDPMEditConfig(skip=1)))[0]
    written = _read(tmp_path / "plain" / "edit-0.png")
    assert (written - expected).abs().max() <= 0.5 / 255 + 1e-6  # the PNG's rounding to 8 bits only
    params = read_parameters(tmp_path / "plain" / "edit-0.png")
    assert params["crop_top_left"] == [4, 8] and params["original_size"] == [32, 48]
    assert main(args + ["--p2p", "--out", str(tmp_path / "p2p")]) == 0
    assert read_parameters(tmp_path / "p2p" / "edit-0.png")["p2p"] is True


# --- DDIM inversion, null-text inversion and Prompt-to-Prompt on a real image --------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.5])
@torch.no_grad()
def test_ddim_inversion_matches_ddim_inverse_scheduler_in_the_xl_pipeline(sdxl, guidance):
    """diffusers' DDIMInverseScheduler (SD's config: leading + 1, ᾱ_0 before the first step) run by
    StableDiffusionXLPipeline from the latents: every pivot equal (no negative prompt: zeros under guidance)."""
    from diffusers import DDIMInverseScheduler

    from editing.bench.peers import scheduler_config
    from inversion.ddim_inversion import ddim_invert, inversion_sampler

    model, pipe, _ = sdxl
    z0 = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    pivots = ddim_invert(model, z0, SOURCE, inversion_sampler(model, STEPS), guidance)
    pipe.scheduler = DDIMInverseScheduler.from_config(scheduler_config("epsilon"))
    theirs = []

    def keep(pipeline, i, t, kwargs):
        theirs.append(kwargs["latents"].clone())
        return kwargs

    pipe(SOURCE, height=32, width=48, num_inference_steps=STEPS, guidance_scale=guidance, latents=z0.clone(),
         output_type="latent", callback_on_step_end=keep)
    assert pipe.scheduler.timesteps.tolist() == [166 * k + 1 for k in range(STEPS)]
    # measured ≤ 3e-7: the same sums in another module, over six steps
    assert relative_error(torch.stack(theirs), torch.stack(pivots[1:])) <= 1e-5


def _trained_like(seed: int = 0) -> StableDiffusion:
    """tiny_sdxl with its default initialisation, changed (deterministically) to behave like a trained model in
    the two ways null-text inversion relies on, as tests/test_null_text.py does for SD 1.x:
    - UNet output layer × 0.1: ε̂ is small and smooth in x, so DDIM inversion at w = 1 round-trips;
    - both text encoders' residual streams × 0.1 (token and position embeddings, every block's attention and
      MLP output; the LayerNorms make the rest scale-free) with the cross-attention keys and values × 10: the
      same function, with the context at a scale where Adam's lr = 1e-2 moves it noticeably in 5 steps."""
    torch.manual_seed(seed)
    model = StableDiffusion(tiny_sdxl()).eval()
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(0.1)
        model.unet.conv_out.bias.mul_(0.1)
        for encoder in (model.text_encoder, model.text_encoder_2):
            for name, parameter in encoder.named_parameters():
                if "embedding" in name or "out_proj" in name or "fc2" in name:
                    parameter.mul_(0.1)
        for name, module in model.unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(10.0)
                module.to_v.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def trained_like():
    return _trained_like()


def test_null_text_reconstructs_better_than_ddim_inversion(trained_like):
    from inversion.ddim_inversion import ddim_invert, ddim_reconstruct, inversion_sampler
    from inversion.null_text import NullTextConfig, early_stop_threshold, null_text_inversion, null_text_predictor
    from ldm.pipeline import denoise, guided_added, latent_conditioning

    model = trained_like
    sampler = inversion_sampler(model, 5)
    z0 = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    result = null_text_inversion(model, z0, SOURCE, sampler, NullTextConfig(guidance=7.5))
    nti = (result.reconstruction - z0).pow(2).mean().item()
    pivots = ddim_invert(model, z0, SOURCE, sampler, guidance=1.0)
    with torch.no_grad():
        plain = (ddim_reconstruct(model, pivots[-1], SOURCE, sampler, 1.0) - z0).pow(2).mean().item()
        ddim = {negative: (ddim_reconstruct(model, pivots[-1], SOURCE, sampler, 7.5, negative) - z0).pow(2).mean().item()
                for negative in (None, "")}
    # measured MSE: null-text 3.9e-4; DDIM at w = 1 there and back 2.6e-3; inverted at w = 1, sampled at 7.5:
    # 0.11 (zeros as the unconditional branch), 6.0e-3 (the empty prompt, where ∅ starts)
    assert nti * 10 <= ddim[""] and nti * 100 <= ddim[None] and nti < plain
    assert result.null_embeddings[0].shape == (1, 77, 80) and result.null_added.text_embeds.shape == (1, 48)
    for i, losses in enumerate(result.losses):  # the early-stop rule, step by step
        threshold = early_stop_threshold(i, NullTextConfig())
        assert all(loss >= threshold for loss in losses[:-1]) and (len(losses) == 10 or losses[-1] < threshold)
    assert all(losses[-1] < losses[0] for losses in result.losses)
    # guided DDIM from z*_N with [∅_i; c] (and the fixed pooled rows) replays the optimised trajectory exactly
    with torch.no_grad():
        context, added = latent_conditioning(model, [SOURCE], None, 1.0, z0)
        predict = null_text_predictor(model.unet, result.null_embeddings, context, 7.5, sampler,
                                      guided_added(result.null_added, added, 1))
        assert torch.equal(denoise(sampler, predict, result.noise, None, progress=False), result.reconstruction)
    assert all(p.grad is None for p in model.parameters())  # gradients went to ∅ only


def test_prompt_to_prompt_on_a_real_image_with_null_text(trained_like, tmp_path):
    """``editlab p2p --image`` on SDXL weights equals ``edit_real_image`` (null-text inversion, then P2P with
    the null-text notebook's settings), which is deterministic; the identity edit is exact, the source row is
    the null-text reconstruction, the edit changes the image."""
    import dataclasses

    from editing.cli import main
    from editing.p2p.edit import REAL_IMAGE_CONFIG, edit_real_image
    from ldm.images import save_png
    from ldm.pipeline import SamplingConfig, decode_latents

    trained_like.save(tmp_path / "xl.safetensors")
    model = StableDiffusion.load(tmp_path / "xl.safetensors")  # as the command runs it (fused projections)
    save_png(tmp_path / "in.png", _image(16, 24, seed=4)[0], {"test": "input"})
    image = _read(tmp_path / "in.png")[None]
    sampling = SamplingConfig(steps=3, guidance=7.5, height=16, width=24)
    config = dataclasses.replace(REAL_IMAGE_CONFIG, blend_words=("cat", "dog"))
    result, inverted = edit_real_image(model, image, SOURCE, [SOURCE, TARGET], sampling, config)
    again, _ = edit_real_image(model, image, SOURCE, [SOURCE, TARGET], sampling, config)
    assert torch.equal(result.latents, again.latents)  # same image, same numbers
    assert torch.equal(result.latents[1], result.latents[0])  # the identity edit, exactly
    reconstruction = inverted.details.reconstruction  # fitted on the same batch layout (3 rows)
    # the inversion encoded one prompt, the edit three: their contexts may round differently
    assert (result.latents[0] - reconstruction).abs().max() <= 1e-4 * reconstruction.abs().max()
    assert (result.latents[2] - result.latents[0]).abs().max() > 1e-2 * reconstruction.abs().max()

    assert main(["p2p", "--weights", str(tmp_path / "xl.safetensors"), "--image", str(tmp_path / "in.png"),
                 "--prompt", SOURCE, "--edit", SOURCE, "--edit", TARGET, "--blend", "cat", "dog", "--steps", "3",
                 "--out", str(tmp_path / "out")]) == 0
    expected = decode_latents(model, result.latents)
    for row, name in enumerate(["source", "edited-1", "edited-2"]):
        assert (_read(tmp_path / "out" / f"{name}.png") - expected[row]).abs().max() <= 0.5 / 255 + 1e-6


# --- Prompt-to-Prompt's attention levels on SDXL -----------------------------------------------------------


@torch.no_grad()
def test_p2p_maps_and_self_replacement_use_sdxl_levels(sdxl):
    """SDXL has attention at levels 1 and 2 only (none at the first, full-resolution level). The maps P2P
    stores, blends and shows are level 2 (latent/4: SDXL's 32² at 1024 px, the 1024-token layers LEDITS++ XL
    and the SDXL P2P ports aggregate) from down, mid and up alike; their average equals one recomputed from the
    probabilities every layer used. Self-attention is replaced at level 2 only, for generated and real images
    (the SDXL ports' ≤ 32² at 1024 px), where SD's real-image setting goes one level further (≤ 32² at 512 px)."""
    from editing.p2p.edit import REAL_IMAGE_CONFIG, P2PConfig, build_controller, prompt_to_prompt
    from ldm.attention import attention_layers
    from ldm.config import sdxl_base, tiny_sd1
    from ldm.hooks import AttentionHook, guidance_rows
    from ldm.pipeline import SamplingConfig
    from ldm.unet import UNet
    from editing.p2p.schedules import default_map_level, level_shape

    class Recorder(AttentionHook):  # the conditional rows' cross-attention of every layer, summed over steps
        def __init__(self):
            self.sums = {}

        def wants_probabilities(self, layer):
            return layer.kind == "cross"

        def edit_probabilities(self, layer, probs, rows):
            cond = probs[guidance_rows(probs.shape[0], 2)[1]].mean(dim=1)  # [B, heads, q, K] -> [B, q, K]
            total = self.sums.setdefault(layer.name, torch.zeros(cond.shape[0], 16 * 24 // 4 ** layer.level, 77))
            total[:, rows] += cond
            return probs

    model, _, _ = sdxl
    layers = attention_layers(model.unet)
    assert {layer.level for layer in layers.values()} == {1, 2}
    level_2 = {name for name, layer in layers.items() if layer.kind == "cross" and layer.level == 2}
    assert len(level_2) == 2 * 3 + 3 + 3 * 3 and {name.split(".")[0] for name in level_2} == {"down", "mid", "up"}

    recorder, steps = Recorder(), 3
    cfg = SamplingConfig(steps=steps, guidance=5.0, scheduler="ddim", seed=3, height=32, width=48)
    result = prompt_to_prompt(model, SOURCE, TARGET, cfg, P2PConfig(self_replace=(0.0, 1.0)),
                              attention_hooks=[recorder])
    assert result.map_level == 2 and result.maps.shape == (2, 4, 6, 77)  # latent 16×24 / 4
    assert set(result.controller.store.layer_levels) == level_2
    expected = torch.stack([recorder.sums[name] for name in sorted(level_2)]).mean(dim=0) / steps
    assert relative_error(expected.view(2, 4, 6, 77), result.maps) <= 1e-6  # the same sums, another order
    self_2 = {name for name, layer in layers.items() if layer.kind == "self" and layer.level == 2}
    assert all(set(names) == self_2 for names in result.controller.replaced_per_step)
    real = build_controller(model, [SOURCE, TARGET], steps, (16, 24), REAL_IMAGE_CONFIG)
    assert real.self_min_level == 2
    sd1 = StableDiffusion(tiny_sd1())
    assert build_controller(sd1, [SOURCE, TARGET], steps, (16, 16), REAL_IMAGE_CONFIG).self_min_level == \
        default_map_level(sd1.unet) - 1

    with torch.device("meta"):  # the full SDXL base UNet, shapes only
        base = UNet(sdxl_base().unet)
    counts = {level: sum(1 for layer in attention_layers(base).values() if layer.kind == "cross" and layer.level == level)
              for level in (0, 1, 2)}
    assert default_map_level(base) == 2 and counts == {0: 0, 1: 10, 2: 60}
    assert level_shape((128, 128), 2) == (32, 32) and level_shape((128, 192), 1) == (64, 96)
