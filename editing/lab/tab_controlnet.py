"""The ControlNet tab: a hint (uploaded, or Canny edges detected in a photo and previewed), its strength, guess mode.

ControlNet (docs/methods.md §7) adds a trainable copy of the UNet's encoder that reads the hint and feeds
zero-initialised residuals into the locked UNet; ``scale`` multiplies those residuals, and guess mode drops the
control from the unconditional half and ramps the scales from shallow to deep. The Canny preview calls the
command's own detector (``editing.commands.controlnet.detect_canny``), so the edges shown are the hint it uses.

No ControlNet is bundled with the toy model: the tab needs a ControlNet file made for the model in use (a released
one converted by ``editlab convert``, or one trained by ``editlab train-controlnet``), named by its path.
"""

from __future__ import annotations

from pathlib import Path

from ..cli import user_error_message
from . import ui
from .context import LabContext
from .inputs import run_knobs, readable_image, toy_scene_file, upload, upload_box

TITLE = "ControlNet"
DEFAULT_SCENE = "blue square"
OUT = "controlnet.png"
NO_CONTROLNET = ("give a ControlNet file: none is bundled with the toy model (convert a released one with editlab "
                 "convert, or train one for the toy model with editlab train-controlnet)")


def arguments(control: str | Path | None = None, hint_source: str = "detect", image=None, hint=None,
              canny_low: float = 100.0, canny_high: float = 200.0, scale: float = 1.0, guess_mode: bool = False,
              prompt: str = "a blue square on a white background", steps: int = 20, guidance: float = 9.0,
              seed: int = 0):
    """The ``editlab controlnet`` line of these knobs: (command, arguments, uploads). ``hint_source``: "detect"
    (Canny on ``image``, default the toy scene of a blue square) or "upload" (``hint`` is the hint itself)."""
    if control in (None, ""):
        raise ValueError(NO_CONTROLNET)
    uploads: dict = {}
    args = ["--control", f"{Path(control).resolve()}:{ui.number(scale)}"]
    if hint_source == "upload":
        if hint in (None, ""):
            raise ValueError("upload a hint image (e.g. white edges on black), or detect one in a photo")
        args += ["--hint", upload(uploads, "hint", hint, DEFAULT_SCENE)]
    else:
        args += ["--detect", "canny", "--image", upload(uploads, "image", image, DEFAULT_SCENE),
                 "--canny-low", ui.number(canny_low), "--canny-high", ui.number(canny_high)]
    args += ["--prompt", prompt] + (["--guess-mode"] if guess_mode else [])
    args += ["--steps", ui.number(steps), "--guidance", ui.number(guidance), "--seed", ui.number(seed), "--out", OUT]
    return "controlnet", args, uploads


def handle(lab: LabContext, **knobs) -> dict:
    return run_knobs(lab, "controlnet", arguments, knobs, OUT)[1]


def canny_preview(lab: LabContext, image=None, canny_low: float = 100.0, canny_high: float = 200.0):
    """(the hint the command will detect, as a PIL image, "") or (None, the one line the command would print)."""
    from controls import CannyConfig
    from ldm.images import to_pil

    from ..checks import native_side, weights_kind
    from ..commands.controlnet import detect_canny
    from ..options import TOY_WEIGHTS

    weights = lab.weights or TOY_WEIGHTS
    try:
        config = weights_kind(Path(weights))[1]
        if config is None:
            return None, f"{weights} is not a converted editlab file: convert it (editlab convert) for a preview"
        path = Path(image) if image not in (None, "") else toy_scene_file(lab.folder, DEFAULT_SCENE)
        hint = detect_canny(path, CannyConfig(float(canny_low), float(canny_high)), native_side(config))
    except Exception as err:  # what the command would say about these inputs, as one line
        message = user_error_message("controlnet", err)
        if message is None:
            raise
        return None, message
    return to_pil(hint[0]), ""


def build(lab: LabContext) -> None:
    import gradio as gr

    gr.Markdown("Generate an image that follows a spatial hint. **No ControlNet is bundled with the toy model**: "
                "give the path of a ControlNet file for the model in use (`editlab convert` a released one, or "
                "`editlab train-controlnet`).")
    with gr.Row():
        with gr.Column():
            image, _ = upload_box("photo to detect edges in (default: a toy scene)",
                                  toy_scene_file(lab.folder, DEFAULT_SCENE))
            knobs = {
                "control": gr.Textbox(label="ControlNet file (path)", value=str(getattr(lab, "controlnet", "") or ""),
                                      placeholder="e.g. /models/control_canny.safetensors"),
                "hint_source": gr.Radio([("detect Canny edges in the photo", "detect"), ("upload a hint", "upload")],
                                        value="detect", label="hint"),
                "image": image,
                "canny_low": gr.Slider(0, 1000, value=100, step=1, label="Canny low threshold"),
                "canny_high": gr.Slider(0, 1000, value=200, step=1, label="Canny high threshold"),
                "hint": gr.File(label="hint image (white edges on black)", file_types=["image"], type="filepath"),
                "prompt": gr.Textbox(label="prompt", value="a blue square on a white background"),
                "scale": gr.Slider(0, 2, value=1.0, step=0.05, label="control scale"),
                "guess_mode": gr.Checkbox(label="guess mode", value=False),
                "steps": gr.Slider(1, 100, value=20, step=1, label="steps"),
                "guidance": gr.Slider(0, 15, value=9.0, step=0.5, label="guidance"),
                "seed": gr.Number(value=0, precision=0, label="seed"),
            }
            run, stop = ui.run_buttons()
        with gr.Column():
            hint_preview = gr.Image(canny_preview(lab)[0], label="hint (the command's detector)", type="pil",
                                    format="png", interactive=False, height=256, elem_classes=["editlab-pixels"])
            shown = {"image": ui.image("generated")}
            shown.update(ui.result_panel())

    def preview(source, image, hint, low, high):
        if source == "upload":
            return readable_image(hint), ""
        return canny_preview(lab, image, low, high)

    preview_inputs = [knobs[name] for name in ("hint_source", "image", "hint", "canny_low", "canny_high")]
    for knob in preview_inputs:
        knob.change(preview, preview_inputs, [hint_preview, shown["message"]], **ui.PRIVATE)
    ui.wire(lab, run, stop, handle, knobs, shown)
