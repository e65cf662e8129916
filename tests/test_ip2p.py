"""InstructPix2Pix editing (editing/instruct_pix2pix/editor.py) against diffusers'
StableDiffusionInstructPix2PixPipeline on a tiny random 8-channel model, plus the guidance formula, the
conditioning latent and the s_I < 1 departure.

Both sides get the same pre-sized image (docs/methods.md §6.3 item 4), seed, steps and scales; diffusers draws the
initial latents randn((B, 4, h, w)) on the generator and then each step's noise, like editlab, and encodes the
image by the posterior mode (argmax) without scaling. Measured max|a − b| / max|a|: 0 (bit-identical) for DDIM and
Euler.
"""

import pytest
import torch

from controls.image_condition import image_condition, instruction_context, three_way_guidance
from editing.bench.peers import diffusers_components, diffusers_scheduler
from editing.instruct_pix2pix.editor import EditConfig, edit_by_instruction, edit_sampler
from ldm.config import tiny_sd1
from ldm.model import StableDiffusion
from ldm.schedulers import NoiseSchedule, log_linear_sigma_grid
from tests.peers import randomize_, relative_error

CFG = tiny_sd1(8)
INSTRUCTIONS = ["make it snowy", "turn the cat into a dog"]


@pytest.fixture(scope="module")
def model():
    return randomize_(StableDiffusion(CFG), seed=0).eval()


@pytest.fixture(scope="module")
def pipe(model):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    unet, vae, text, tokenizer = diffusers_components(model)
    pipe = StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                  scheduler=diffusers_scheduler("ddim", "epsilon"), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(batch=1, height=16, width=24, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def diffusers_latents(pipe, scheduler, cfg: EditConfig, image, prompt):
    pipe.scheduler = diffusers_scheduler(scheduler, "epsilon")  # Euler: diffusers' default "linspace" grid
    return pipe(prompt=prompt, image=image, num_inference_steps=cfg.steps, guidance_scale=cfg.text_guidance,
                image_guidance_scale=cfg.image_guidance, eta=cfg.eta, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(cfg.seed)).images


@pytest.mark.parametrize("scheduler,spacing,eta,scales", [
    ("ddim", None, 0.0, (7.5, 1.5)), ("ddim", None, 1.0, (3.0, 1.0)), ("euler-a", "linspace", 0.0, (7.5, 1.5))])
def test_final_latents_match_diffusers(model, pipe, scheduler, spacing, eta, scales):
    cfg = EditConfig(text_guidance=scales[0], image_guidance=scales[1], steps=6, scheduler=scheduler,
                     spacing=spacing, eta=eta, seed=4)
    image = images(batch=2)
    before = image.clone()
    ours = edit_by_instruction(model, image, INSTRUCTIONS, cfg, progress=False)
    ref = diffusers_latents(pipe, scheduler, cfg, image, INSTRUCTIONS)
    assert ours.shape == (2, 4, 8, 12) and ref.abs().max() > 0.1
    assert relative_error(ref, ours) <= 1e-4
    assert torch.equal(image, before)  # the caller's tensor is not changed


class RecordingUNet(torch.nn.Module):
    """The model's UNet, keeping every input batch it was given."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.inputs, self.contexts = unet, [], []

    def forward(self, x, t, context):
        self.inputs.append(x.clone())
        self.contexts.append(context.clone())
        return self.unet(x, t, context)


def test_conditioning_is_the_raw_posterior_mode_and_the_null_image_is_zero(model):
    image = images()
    raw_mode = model.vae.encode(image * 2 - 1).mean
    c_image = image_condition(model, image)
    assert torch.equal(c_image, raw_mode)  # unscaled: not 0.18215·mode
    assert not torch.allclose(c_image, model.vae.scale_latents(raw_mode))
    recorder = RecordingUNet(model.unet)
    cfg = EditConfig(steps=2, scheduler="ddim")
    sampler = edit_sampler(cfg)
    context = instruction_context(model, INSTRUCTIONS[:1], 1)
    predict = three_way_guidance(recorder, context, c_image, 7.5, 1.5)
    predict(sampler.scale_model_input(torch.randn(1, 4, 8, 12), 0), sampler.timesteps[0])
    unet_in = recorder.inputs[0]  # [3, 8, h, w]: rows [(c_T, c_I), (∅_T, c_I), (∅_T, ∅_I)]
    assert torch.equal(unet_in[0, 4:], raw_mode[0]) and torch.equal(unet_in[1, 4:], raw_mode[0])
    assert torch.equal(unet_in[2, 4:], torch.zeros_like(raw_mode[0]))
    assert torch.equal(unet_in[0, :4], unet_in[2, :4])  # the same noisy latent in every row
    null, cond = model.encode_prompt([""]), model.encode_prompt(INSTRUCTIONS[:1])
    assert torch.equal(recorder.contexts[0], torch.cat([cond, null, null]))


@pytest.mark.parametrize("text_scale,image_scale", [(7.5, 1.5), (4.0, 0.5)])
def test_guidance_formula_from_three_separate_calls(model, text_scale, image_scale):
    """ε̃ = ε(∅,∅) + s_I(ε(c_I,∅) − ε(∅,∅)) + s_T(ε(c_I,c_T) − ε(c_I,∅)), each ε from its own UNet call."""
    sampler = edit_sampler(EditConfig(steps=4))  # Euler: the UNet sees c_in·x
    c_image = image_condition(model, images())
    context = instruction_context(model, INSTRUCTIONS[:1], 1)
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1)) * sampler.init_noise_sigma
    t = sampler.timesteps[1]
    x_in = sampler.scale_model_input(x, 1)
    with torch.no_grad():
        eps = lambda ctx, img: model.unet(torch.cat([x_in, img], 1), t, ctx)
        full, image_only = eps(context[:1], c_image), eps(context[1:2], c_image)
        unconditional = eps(context[2:], torch.zeros_like(c_image))
        predicted = three_way_guidance(model.unet, context, c_image, text_scale, image_scale)(x_in, t)
    expected = unconditional + image_scale * (image_only - unconditional) + text_scale * (full - image_only)
    assert relative_error(expected, predicted) <= 1e-5
    assert relative_error(expected, full) > 0.01  # the guidance does change the prediction


def test_image_scale_below_one_still_guides(model, pipe):
    """diffusers drops all guidance when s_I < 1 (two such runs agree whatever s_I is); editlab does not."""
    image = images()
    ours = {s: edit_by_instruction(model, image, INSTRUCTIONS[:1],
                                   EditConfig(image_guidance=s, steps=3, scheduler="ddim"), progress=False)
            for s in (0.5, 0.9, 1.0)}
    assert relative_error(ours[1.0], ours[0.5]) > 1e-2 and relative_error(ours[0.9], ours[0.5]) > 1e-3
    ref = {s: diffusers_latents(pipe, "ddim", EditConfig(image_guidance=s, steps=3), image, INSTRUCTIONS[:1])
           for s in (0.5, 0.9)}
    assert torch.equal(ref[0.5], ref[0.9])  # diffusers: guidance off, the scale is ignored


def test_default_sampler_is_edit_cli_euler_ancestral():
    sampler = edit_sampler(EditConfig())
    timesteps, sigmas = log_linear_sigma_grid(NoiseSchedule.scaled_linear(), 100)
    assert sampler.name == "euler-a" and len(sampler.timesteps) == 100
    assert torch.equal(sampler.timesteps, timesteps) and torch.equal(sampler.sigmas, sigmas)
    assert sampler.init_noise_sigma == pytest.approx(float(sigmas[0]))  # z = σ_0·N(0, I)


def test_instruction_embedding_replaces_the_encoded_text(model):
    image, cfg = images(), EditConfig(steps=2, scheduler="ddim")
    embedding = model.encode_prompt(INSTRUCTIONS[:1])[0]  # [77, C]
    by_text = edit_by_instruction(model, image, INSTRUCTIONS[:1], cfg, progress=False)
    by_embedding = edit_by_instruction(model, image, None, cfg, instruction_embedding=embedding, progress=False)
    assert torch.equal(by_text, by_embedding)
    with pytest.raises(ValueError, match=r"does not fit this model; it must be \[77, 32\]"):
        edit_by_instruction(model, image, None, cfg, instruction_embedding=torch.zeros(77, 64))
    with pytest.raises(ValueError, match="exactly one of the two"):
        edit_by_instruction(model, image, INSTRUCTIONS[:1], cfg, instruction_embedding=embedding)
    learned = torch.zeros(77, 32, requires_grad=True)  # Visii optimises it through the context: gradients reach it
    context = instruction_context(model, None, 2, learned)
    (context[:2] * 3).sum().backward()
    assert torch.equal(learned.grad, torch.full((77, 32), 6.0))


def test_bad_inputs_get_one_line_errors(model):
    plain = StableDiffusion(tiny_sd1())
    with pytest.raises(ValueError, match="takes 4 input channels, InstructPix2Pix needs 8"):
        edit_by_instruction(plain, images(), INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        edit_by_instruction(model, images(height=20), INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="2 instructions for 1 images"):
        edit_by_instruction(model, images(), INSTRUCTIONS)


def test_single_file_checkpoint_converts_and_edits_like_diffusers(tmp_path, pipe):
    """A checkpoint in the original instruct-pix2pix layout (model.diffusion_model.*, model_ema.*, first_stage_model.*,
    cond_stage_model.transformer.*) converts to an 8-channel "ip2p" model using the EMA UNet by default, and edits
    like the same file loaded by diffusers' own single-file loader with extract_ema=True."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from tests.peers import ldm_checkpoint, write_diffusers_configs
    from weights_convert import convert

    source = ldm_checkpoint(CFG, seed=3, ema=True)
    torch.save({"state_dict": source, "global_step": 22000}, tmp_path / "ip2p.ckpt")
    report = convert(tmp_path / "ip2p.ckpt", tmp_path / "ip2p.safetensors", config=CFG.replace(family="sd1"))
    model = StableDiffusion.load(tmp_path / "ip2p.safetensors")
    assert model.config.family == "ip2p" and model.config.unet.in_channels == 8  # detected from conv_in
    assert report.info["ema"] == "used"
    assert torch.equal(model.unet.conv_in.weight, source["model_ema.diffusion_modelinput_blocks00weight"])

    reference = StableDiffusionInstructPix2PixPipeline.from_single_file(
        str(tmp_path / "ip2p.ckpt"), config=str(write_diffusers_configs(CFG, tmp_path / "configs")), extract_ema=True,
        tokenizer=pipe.tokenizer, scheduler=diffusers_scheduler("euler-a", "epsilon"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    cfg = EditConfig(steps=5, scheduler="euler-a", spacing="linspace", seed=8)
    ours = edit_by_instruction(model, images(seed=2), INSTRUCTIONS[:1], cfg, progress=False)
    ref = diffusers_latents(reference, "euler-a", cfg, images(seed=2), INSTRUCTIONS[:1])
    assert ref.abs().max() > 0.1 and relative_error(ref, ours) <= 1e-4
