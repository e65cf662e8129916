"""The Prompt-to-Prompt tab (Hertz et al., ICLR 2023): edit a generated image by editing its prompt
(``editlab p2p``), and look at the cross-attention maps that make it work.

The source prompt and the edited prompt are sampled together from the same noise. In every cross-attention
layer the edited row takes the source row's maps for the first τ_c of the steps, so the layout stays and only
what the changed words draw changes:

    word swap   A_edit ← A_src · M          (M maps each source token to its replacement; same word count)
    refine      A_edit[n] ← A_src[m(n)]     for the tokens both prompts share; added words keep their own maps
    reweight    A_edit[n] ← A_src[n] · c_n  (c_n: the factor given to a word; below 1 less of it, above 1 more)

Self-attention (the image's own layout) is copied from the source for the steps in [0, τ_s·N). Local blending
keeps the pixels outside the attention of the given words from the source. The maps shown are per token: the
mean over the steps, or, with the step slider, the maps of one denoising step alone (``--maps-per-step`` writes
one PNG per step; the slider only picks a file).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import ui
from .context import LabContext

TITLE = "Prompt-to-Prompt"
OUT = "p2p"
MODES = {"word swap": "swap", "refine": "refine", "reweight": "reweight"}


def arguments(prompt: str, edit: str = "", mode: str = "word swap", reweight: str = "", cross_replace: float = 0.8,
              self_replace: float = 0.4, blend: str = "", steps: int = 20, guidance: float = 7.5,
              seed: int = 0) -> tuple[str, list[str], dict]:
    """The ``editlab p2p`` arguments of the knobs. ``reweight``: 'WORD=FACTOR ...'; in the reweight mode the
    edited prompt may be left empty (the source prompt is reweighted)."""
    argv = ["--prompt", prompt]
    kind = MODES[mode]
    if edit or kind != "reweight":
        argv += ["--edit", edit]
    if kind == "refine":
        argv += ["--mode", "refine"]
    if ui.words(reweight):
        argv += ["--reweight", *ui.words(reweight)]
    argv += ["--cross-replace", ui.number(cross_replace), "--self-replace", "0", ui.number(self_replace)]
    if ui.words(blend):
        argv += ["--blend", *ui.words(blend)]
    argv += ["--steps", ui.number(steps), "--guidance", ui.number(guidance), "--seed", ui.number(seed),
             "--maps-per-step", "--out", OUT]
    return "p2p", argv, {}


def maps_at(folder: str | None, step: int) -> tuple[str | None, str | None]:
    """The attention maps of the source and the edit: the mean over steps (step 0), or step k's own (1..N)."""
    if not folder:
        return None, None
    out, step = Path(folder) / OUT, int(step)
    suffix = "" if step == 0 else f"-step-{step - 1:03d}"
    paths = [out / f"attention-{name}{suffix}.png" for name in ("source", "edited")]
    return tuple(str(path) if path.is_file() else None for path in paths)


def handle(lab: LabContext, **knobs) -> dict:
    """Run the command; what the page shows, by name (``folder``: the run's folder, for the step slider)."""
    result = lab.run(*arguments(**knobs))
    folder = None if result.error else str(result.folder)
    source_maps, edited_maps = maps_at(folder, 0)
    steps = sum(1 for path in result.outputs if path.name.startswith("attention-source-step-"))
    return {"source": ui.output(result, "source.png"), "edited": ui.output(result, "edited.png"),
            "source_maps": source_maps, "edited_maps": edited_maps, "folder": folder,
            "step": gr.Slider(minimum=0, maximum=max(steps, 1), value=0, step=1), **ui.result_values(result)}


def build(lab: LabContext) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            knobs = {
                "prompt": gr.Textbox(label="source prompt", value="a red circle on a blue background",
                                     elem_id="p2p-prompt"),
                "edit": gr.Textbox(label="edited prompt", value="a red square on a blue background",
                                   elem_id="p2p-edit"),
                "mode": gr.Radio(list(MODES), value="word swap", label="edit"),
                "reweight": gr.Textbox(label="reweight: WORD=FACTOR ... (any mode; e.g. red=2)", value=""),
                "cross_replace": gr.Slider(0, 1, value=0.8, step=0.05,
                                           label="cross-attention replaced for this fraction of the steps (τ_c)"),
                "self_replace": gr.Slider(0, 1, value=0.4, step=0.05,
                                          label="self-attention replaced for this fraction of the steps (τ_s)"),
                "blend": gr.Textbox(label="local blend words (edit only where they attend; empty: everywhere)",
                                    value=""),
                "steps": gr.Slider(1, 100, value=20, step=1, label="DDIM steps", elem_id="p2p-steps"),
                "guidance": gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale"),
                "seed": gr.Number(value=0, precision=0, label="seed"),
            }
            run, stop = ui.run_buttons()
        with gr.Column(scale=3):
            with gr.Row():
                shown = {"source": ui.image("source", "p2p-source"), "edited": ui.image("edit", "p2p-edited")}
            shown["step"] = gr.Slider(0, 1, value=0, step=1, elem_id="p2p-step",
                                      label="attention maps at denoising step (0: mean over all steps)")
            for row, name in (("source", "source prompt"), ("edited", "edited prompt")):
                shown[f"{row}_maps"] = ui.image(f"cross-attention per token: {name}", f"p2p-{row}-maps", 240,
                                                pixels=False)
            shown.update(ui.result_panel())
    shown["folder"] = gr.State(None)
    ui.wire(lab, run, stop, handle, knobs, shown)
    shown["step"].change(maps_at, [shown["folder"], shown["step"]], [shown["source_maps"], shown["edited_maps"]],
                         queue=False)
