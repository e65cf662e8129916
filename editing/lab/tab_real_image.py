"""The real-image tab: edit an uploaded picture three ways, each an ``editlab`` command.

- Inversion, then Prompt-to-Prompt (``editlab p2p --image``; Mokady et al., CVPR 2023): DDIM inversion runs the
  deterministic sampler backwards, x_{t+1} = √ᾱ_{t+1}·x̂_0(x_t) + √(1−ᾱ_{t+1})·ε(x_t), to a noise that
  regenerates the picture; under guidance the path drifts, so null-text inversion then tunes the unconditional
  embedding ∅_t of every step until each guided step lands on the inverted path again. The edit is
  Prompt-to-Prompt from that noise; "source" is the reconstruction.
- Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024; ``editlab ddpm-edit``): noisy
  copies x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε̃_t with independent ε̃_t, and the noise maps z_t = (x_{t−1} − μ_t(x_t))/σ_t
  that make the DDPM sampler retrace them exactly. Regenerating from step ``skip`` under the target prompt with those
  maps edits the picture; w_src is the guidance of the inversion, w_tar of the edit, and every sample draws other
  ε̃_t. The noise-map statistics (``editlab ddpm-stats``) show why the maps are "edit-friendly": their variance
  is above 1 and consecutive maps are negatively correlated, unlike the sampler's own N(0, I) noise.
- SDEdit (Meng et al., ICLR 2022; ``editlab sdedit``): noise the picture to the level ``strength`` and denoise
  under the prompt; more strength follows the prompt more and the picture less.
"""

from __future__ import annotations

import gradio as gr

from . import ui
from .context import LabContext

TITLE = "Real image"
P2P_OUT, DDPM_OUT, SDEDIT_OUT = "p2p", "ddpm", "sdedit.png"


def _upload(image) -> tuple[list[str], dict]:
    """``--image NAME`` and the upload to copy into the run's folder under NAME."""
    if not image:
        return ["--image", "input.png"], {}  # the command names the missing file
    name = ui.upload_name(image)
    return ["--image", name], {name: image}


def p2p_arguments(image, prompt: str, edit: str, inversion: str = "null-text", mode: str = "swap",
                  cross_replace: float = 0.8, self_replace: float = 0.5, blend: str = "", steps: int = 10,
                  guidance: float = 7.5) -> tuple[str, list[str], dict]:
    image_args, uploads = _upload(image)
    argv = [*image_args, "--prompt", prompt, "--edit", edit, "--inversion", inversion, "--mode", mode,
            "--cross-replace", ui.number(cross_replace), "--self-replace", "0", ui.number(self_replace)]
    if ui.words(blend):
        argv += ["--blend", *ui.words(blend)]
    argv += ["--steps", ui.number(steps), "--guidance", ui.number(guidance), "--out", P2P_OUT]
    return "p2p", argv, uploads


def ddpm_arguments(image, source_prompt: str, target_prompt: str, steps: int = 50, skip: int = 18,
                   source_guidance: float = 3.5, target_guidance: float = 7.5, samples: int = 2,
                   seed: int = 0) -> tuple[str, list[str], dict]:
    image_args, uploads = _upload(image)
    argv = [*image_args, "--source-prompt", source_prompt, "--target-prompt", target_prompt,
            "--steps", ui.number(steps), "--skip", ui.number(skip), "--source-guidance", ui.number(source_guidance),
            "--target-guidance", ui.number(target_guidance), "--samples", ui.number(samples),
            "--seed", ui.number(seed), "--out", DDPM_OUT]
    return "ddpm-edit", argv, uploads


def stats_arguments(image, source_prompt: str, steps: int = 50, source_guidance: float = 3.5, samples: int = 2,
                    seed: int = 0) -> tuple[str, list[str], dict]:
    """``editlab ddpm-stats`` on the same picture, prompt, grid and guidance as the edit."""
    image_args, uploads = _upload(image)
    argv = [*image_args, "--prompt", source_prompt, "--steps", ui.number(steps), "--guidance",
            ui.number(source_guidance), "--samples", ui.number(samples), "--seed", ui.number(seed),
            "--every", ui.number(max(1, int(steps) // 10))]
    return "ddpm-stats", argv, uploads


def sdedit_arguments(image, prompt: str, strength: float = 0.6, steps: int = 20, guidance: float = 7.5,
                     seed: int = 0) -> tuple[str, list[str], dict]:
    image_args, uploads = _upload(image)
    argv = [*image_args, "--prompt", prompt, "--strength", ui.number(strength), "--steps", ui.number(steps),
            "--guidance", ui.number(guidance), "--seed", ui.number(seed), "--out", SDEDIT_OUT]
    return "sdedit", argv, uploads


def handle_p2p(lab: LabContext, **knobs) -> dict:
    result = lab.run(*p2p_arguments(**knobs))
    return {"source": ui.output(result, "source.png"), "edited": ui.output(result, "edited.png"),
            "source_maps": ui.output(result, "attention-source.png"),
            "edited_maps": ui.output(result, "attention-edited.png"), **ui.result_values(result)}


def handle_ddpm(lab: LabContext, statistics: bool = True, **knobs) -> dict:
    """The edit, then (if ``statistics``) the noise-map statistics; the command lines one under the other."""
    result = lab.run(*ddpm_arguments(**knobs))
    shown = {"samples": [str(path) for path in result.outputs] or None, **ui.result_values(result),
             "statistics": ""}
    if statistics and not result.error:
        names = ("image", "source_prompt", "steps", "source_guidance", "samples", "seed")
        stats = lab.run(*stats_arguments(**{name: knobs[name] for name in names if name in knobs}))
        shown["command_line"] += "\n" + stats.command_line
        shown["statistics"] = stats.error or stats.printed
        shown["message"] = stats.error or shown["message"]
    return shown


def handle_sdedit(lab: LabContext, **knobs) -> dict:
    result = lab.run(*sdedit_arguments(**knobs))
    return {"edited": ui.output(result, SDEDIT_OUT), **ui.result_values(result)}


def build(lab: LabContext) -> None:
    image = gr.File(label="picture to edit (PNG or JPEG; sides a multiple of the model's 8× or 4× latent factor)",
                    file_types=["image"], type="filepath")
    prompt = gr.Textbox(label="source prompt: describes the picture", value="a red circle on a blue background")
    with gr.Tab("Inversion + Prompt-to-Prompt"):
        with gr.Row():
            with gr.Column():
                knobs = {"image": image, "prompt": prompt,
                         "edit": gr.Textbox(label="edited prompt", value="a red square on a blue background"),
                         "inversion": gr.Radio(["null-text", "ddim"], value="null-text", label="inversion"),
                         "mode": gr.Radio(["swap", "refine"], value="swap", label="edit"),
                         "cross_replace": gr.Slider(0, 1, value=0.8, step=0.05, label="cross-attention τ_c"),
                         "self_replace": gr.Slider(0, 1, value=0.5, step=0.05, label="self-attention τ_s"),
                         "blend": gr.Textbox(label="local blend words", value=""),
                         "steps": gr.Slider(1, 50, value=10, step=1, label="DDIM steps"),
                         "guidance": gr.Slider(1, 15, value=7.5, step=0.5, label="guidance scale")}
                run, stop = ui.run_buttons()
            with gr.Column():
                with gr.Row():
                    shown = {"source": ui.image("reconstruction"), "edited": ui.image("edit")}
                shown["source_maps"] = ui.image("cross-attention per token: source", height=240, pixels=False)
                shown["edited_maps"] = ui.image("cross-attention per token: edit", height=240, pixels=False)
                shown.update(ui.result_panel())
        ui.wire(lab, run, stop, handle_p2p, knobs, shown)
    with gr.Tab("Edit-friendly DDPM inversion"):
        with gr.Row():
            with gr.Column():
                knobs = {"image": image, "source_prompt": prompt,
                         "target_prompt": gr.Textbox(label="target prompt",
                                                     value="a green circle on a blue background"),
                         "steps": gr.Slider(2, 100, value=50, step=1, label="DDPM steps"),
                         "skip": gr.Slider(0, 99, value=18, step=1, label="skip: first steps not regenerated"),
                         "source_guidance": gr.Slider(1, 15, value=3.5, step=0.5, label="w_src (inversion guidance)"),
                         "target_guidance": gr.Slider(1, 20, value=7.5, step=0.5, label="w_tar (edit guidance)"),
                         "samples": gr.Slider(1, 8, value=2, step=1, label="samples (other ε̃_t each)"),
                         "seed": gr.Number(value=0, precision=0, label="seed"),
                         "statistics": gr.Checkbox(value=True, label="noise-map statistics (ddpm-stats)")}
                run, stop = ui.run_buttons()
            with gr.Column():
                shown = {"samples": gr.Gallery(label="edits", format="png", columns=4),
                         "statistics": gr.Textbox(label="noise maps: variance and corr(z_t, z_t−1), native DDPM "
                                                        "vs edit-friendly", lines=8, interactive=False)}
                shown.update(ui.result_panel())
        ui.wire(lab, run, stop, handle_ddpm, knobs, shown)
    with gr.Tab("SDEdit"):
        with gr.Row():
            with gr.Column():
                knobs = {"image": image,
                         "prompt": gr.Textbox(label="prompt", value="a green circle on a blue background"),
                         "strength": gr.Slider(0.05, 1, value=0.6, step=0.05, label="strength (noise level)"),
                         "steps": gr.Slider(1, 100, value=20, step=1, label="steps"),
                         "guidance": gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale"),
                         "seed": gr.Number(value=0, precision=0, label="seed")}
                run, stop = ui.run_buttons()
            with gr.Column():
                shown = {"edited": ui.image("SDEdit")}
                shown.update(ui.result_panel())
        ui.wire(lab, run, stop, handle_sdedit, knobs, shown)
