"""The InstructPix2Pix tab: an image and a written instruction, the two guidance scales, and their grid.

InstructPix2Pix guides with two scales (docs/methods.md §6): s_T pushes towards the instruction, s_I towards the
input image. The grid runs ``editlab ip2p --grid-text ... --grid-image ...``: one edit per (s_T, s_I), laid out
with s_T across and s_I down, so a student sees where the edit starts to happen and where the input is lost.
"""

from __future__ import annotations

from .context import LabContext
from .inputs import Shown, number, readable_image, toy_scene_file, upload

TITLE = "InstructPix2Pix"
COMMAND = "ip2p"
DEFAULT_SCENE = "blue square"
SCHEDULERS = ("ddim", "euler-a")  # the paper's sampler is Euler ancestral; DDIM is deterministic for a seed


def arguments(image=None, instruction: str = "make the square green", text_guidance: float = 7.5,
              image_guidance: float = 1.5, steps: int = 20, scheduler: str = "ddim", seed: int = 0,
              grid: bool = False, grid_text: str = "3,7.5,12", grid_image: str = "1,1.5,2.5"):
    """The ``editlab ip2p`` line of these knobs: (command, arguments, uploads). ``image``: a file path, or None
    for the toy scene of a blue square."""
    uploads: dict = {}
    args = ["--image", upload(uploads, "image.png", image, DEFAULT_SCENE), "--instruction", instruction,
            "--steps", number(steps), "--scheduler", scheduler, "--seed", number(seed)]
    if grid:
        args += ["--grid-text", grid_text, "--grid-image", grid_image, "--out", "grid.png"]
    else:
        args += ["--text-guidance", number(text_guidance), "--image-guidance", number(image_guidance),
                 "--out", "edit.png"]
    return COMMAND, args, uploads


def show(lab: LabContext, **knobs) -> Shown:
    """Run the knobs' command; in grid mode the grid (the last PNG the command prints) comes first."""
    shown = Shown.of(lab.run(*arguments(**knobs)))
    if len(shown.images) > 1:
        shown.images = shown.images[-1:] + shown.images[:-1]
    return shown


def build(lab: LabContext) -> None:
    import gradio as gr

    gr.Markdown("Edit an image by a written instruction. **s_T** (text guidance) pulls towards the instruction, "
                "**s_I** (image guidance) towards the input; the grid shows every pair of the listed scales.")
    with gr.Row():
        with gr.Column():
            image = gr.File(label="input image (default: a toy scene)", file_types=["image"], type="filepath",
                            value=str(toy_scene_file(lab.folder, DEFAULT_SCENE)))
            preview = gr.Image(label="input", type="filepath", interactive=False, height=160,
                               value=str(toy_scene_file(lab.folder, DEFAULT_SCENE)))
            instruction = gr.Textbox(label="instruction", value="make the square green")
            with gr.Row():
                text_guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="s_T (text guidance)")
                image_guidance = gr.Slider(0, 5, value=1.5, step=0.1, label="s_I (image guidance)")
            with gr.Row():
                steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="sampler")
                seed = gr.Number(value=0, precision=0, label="seed")
            grid = gr.Checkbox(label="s_T × s_I grid instead of one edit", value=False)
            with gr.Row():
                grid_text = gr.Textbox(label="grid s_T values", value="3,7.5,12")
                grid_image = gr.Textbox(label="grid s_I values", value="1,1.5,2.5")
            go = gr.Button("Edit", variant="primary")
        with gr.Column():
            message = gr.Textbox(label="message", interactive=False, max_lines=1)
            result = gr.Image(label="result (the command's PNG)", type="filepath", interactive=False)
            cells = gr.Gallery(label="grid cells", columns=3)
            command_line = gr.Code(label="command line (run it in a folder holding image.png)", language="shell")
            files = gr.File(label="PNGs (they carry their parameters)", file_count="multiple", interactive=False)

    image.change(readable_image, image, preview, api_visibility="private")

    def run(image, instruction, text_guidance, image_guidance, steps, scheduler, seed, grid, grid_text,
            grid_image, progress=gr.Progress(track_tqdm=True)):
        shown = show(lab, image=image, instruction=instruction, text_guidance=text_guidance,
                     image_guidance=image_guidance, steps=steps, scheduler=scheduler, seed=seed, grid=grid,
                     grid_text=grid_text, grid_image=grid_image)
        paths = [str(p) for p in shown.images]
        return (shown.message, paths[0] if paths else None, paths[1:], shown.command_line, paths or None)

    go.click(run, [image, instruction, text_guidance, image_guidance, steps, scheduler, seed, grid, grid_text,
                   grid_image], [message, result, cells, command_line, files], api_name="ip2p")
