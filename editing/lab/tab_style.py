"""The Style tab: an IP-Adapter image prompt, its scale, and InstantStyle's choice of the blocks that read it.

IP-Adapter (docs/methods.md §8) adds a second cross-attention to every text cross-attention layer, over tokens
projected from the CLIP embedding of an image: Attn(Q, K_t, V_t) + λ·Attn(Q, K_i, V_i). InstantStyle
(docs/methods.md §9) keeps λ only in chosen blocks, the ones that carry style rather than layout. The diagram draws
the UNet's blocks as the model's config builds them (the UNet is built on the meta device, no weights read) and
colours each cross-attention by the λ the command will give it: the scales come from the functions ``editlab style``
calls.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path

from ..cli import user_error_message
from . import ui
from .context import LabContext
from .inputs import run_knobs, toy_scene_file, upload, upload_box

TITLE = "Style"
DEFAULT_SCENE = "green square"
OUT = "style.png"
ALL_LAYERS = "all layers"
CHOSEN_BLOCKS = "chosen blocks"


def arguments(style_image=None, prompt: str = "", scale: float = 1.0, selection: str = ALL_LAYERS,
              blocks: list[str] | tuple[str, ...] = (), steps: int = 20, guidance: float = 5.0, seed: int = 0):
    """The ``editlab style`` line: (command, arguments, uploads). ``selection``: ``ALL_LAYERS`` (λ everywhere),
    an InstantStyle preset name (λ in its blocks) or ``CHOSEN_BLOCKS`` (λ in ``blocks``, diffusers names)."""
    uploads: dict = {}
    args = ["--style-image", upload(uploads, "style-image", style_image, DEFAULT_SCENE), "--prompt", prompt,
            "--scale", ui.number(scale)]
    if selection == CHOSEN_BLOCKS:
        if not blocks:
            raise ValueError("choose at least one block, or select all layers or a preset")
        for block in blocks:
            args += ["--block", f"{block}={ui.number(scale)}"]
    elif selection != ALL_LAYERS:
        args += ["--preset", selection]
    args += ["--steps", ui.number(steps), "--guidance", ui.number(guidance), "--seed", ui.number(seed), "--out", OUT]
    return "style", args, uploads


def handle(lab: LabContext, **knobs) -> dict:
    return run_knobs(lab, "style", arguments, knobs, OUT)[1]


# ---------------------------------------------------------------------------------------- the UNet's blocks


@dataclass
class Block:
    name: str  # diffusers name: down_blocks.1, mid_block, up_blocks.0
    side: int  # latent side at this block for the model's native image size
    attentions: list[str]  # diffusers names of its attentions that hold a cross-attention layer


def model_unet(lab: LabContext):
    """(the UNet of the lab's weights built on the meta device from the config in the file's header, config)."""
    from ..options import TOY_WEIGHTS

    return _meta_unet(str(lab.weights or TOY_WEIGHTS))


@functools.lru_cache(maxsize=4)
def _meta_unet(weights: str):
    import torch

    from ldm.unet import UNet

    from ..checks import weights_kind

    config = weights_kind(Path(weights))[1]
    if config is None:
        raise ValueError(f"{weights}: not a converted editlab file, so its blocks cannot be read; convert it "
                         "with editlab convert")
    with torch.device("meta"):
        return UNet(config.unet), config


def unet_blocks(unet, config) -> list[Block]:
    """Every block of the UNet in the order a latent passes them: down, mid, up."""
    from controls.ip_adapter import diffusers_block
    from ldm.attention import attention_layers

    from ..checks import native_side

    cross = [diffusers_block(name) for name, layer in attention_layers(unet).items() if layer.kind == "cross"]
    levels = len(config.unet.channel_mult)
    side = native_side(config) // config.vae.downsample_factor
    names = [(f"down_blocks.{i}", side >> i) for i in range(levels)] + [("mid_block", side >> (levels - 1))]
    names += [(f"up_blocks.{i}", side >> (levels - 1 - i)) for i in range(levels)]
    return [Block(name, size, sorted({a for a in cross if a.startswith(name + ".")})) for name, size in names]


def block_choices(lab: LabContext) -> list[str]:
    """The names ``--block`` takes for this model: each block with attention, then each of its attentions."""
    unet, config = model_unet(lab)
    choices = []
    for block in unet_blocks(unet, config):
        if block.attentions:
            choices += [block.name] + (block.attentions if len(block.attentions) > 1 else [])
    return choices


def preset_names(lab: LabContext) -> list[str]:
    from ..instant_style import presets_for

    return sorted(presets_for(model_unet(lab)[0]))


def layer_scales(lab: LabContext, scale: float, selection: str, blocks=()) -> dict[str, float]:
    """{diffusers attention name: λ} the command gives the image branch (the functions ``editlab style`` calls)."""
    from controls.ip_adapter import diffusers_block
    from ldm.attention import attention_layers

    from ..instant_style import block_scales, preset_scales

    unet, _ = model_unet(lab)
    if selection == ALL_LAYERS:
        per_layer = {name: float(scale) for name, layer in attention_layers(unet).items() if layer.kind == "cross"}
    elif selection == CHOSEN_BLOCKS:
        per_layer = block_scales(unet, {block: float(scale) for block in blocks})
    else:
        per_layer = preset_scales(unet, selection, float(scale))
    return {diffusers_block(name): value for name, value in per_layer.items()}


def diagram(lab: LabContext, scale: float = 1.0, selection: str = ALL_LAYERS, blocks=()) -> str:
    """An SVG of the UNet's blocks (down the left, the middle at the bottom, up the right); each cross-attention
    is a box coloured and labelled by its λ, blocks without attention are plain. An unknown block or a preset
    whose blocks this model lacks is written under it, as the command says it."""
    unet, config = model_unet(lab)
    layout = unet_blocks(unet, config)
    try:
        scales, note = layer_scales(lab, scale, selection, blocks), ""
    except ValueError as err:
        scales, note = {}, user_error_message("style", err)
    levels = len(config.unet.channel_mult)
    box_w, box_h, gap = 230, 64, 14
    width, height = 2 * box_w + 3 * gap + 60, (levels + 1) * (box_h + gap) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">']
    for block in layout:
        kind, index = (block.name.split("_blocks.") + ["0"])[:2]
        if kind == "mid_block":
            x, y = (width - box_w) / 2, levels * (box_h + gap) + gap
        elif kind == "down":
            x, y = gap, int(index) * (box_h + gap) + gap
        else:  # up block i sits beside down block (levels − 1 − i)
            x, y = width - box_w - gap, (levels - 1 - int(index)) * (box_h + gap) + gap
        parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="#f4f4f4" stroke="#555"/>')
        parts.append(f'<text x="{x + 6}" y="{y + 15}">{html.escape(block.name)}  ({block.side}×{block.side} latent)'
                     '</text>')
        if not block.attentions:
            parts.append(f'<text x="{x + 6}" y="{y + 38}" fill="#888">ResNet blocks only: no attention</text>')
        slot = (box_w - 12) / max(1, len(block.attentions))
        for k, attention in enumerate(block.attentions):
            value = scales.get(attention, 0.0)
            fill = "#f08c00" if value > 0 else "#dcdcdc"
            ax = x + 6 + k * slot
            parts.append(f'<rect x="{ax}" y="{y + 22}" width="{slot - 4}" height="{box_h - 28}" rx="4" '
                         f'fill="{fill}" stroke="#333"><title>{html.escape(attention)}</title></rect>')
            short = ".".join(attention.split(".")[-2:])  # attentions.0
            parts.append(f'<text x="{ax + 4}" y="{y + 38}">{html.escape(short)}</text>')
            parts.append(f'<text x="{ax + 4}" y="{y + 52}">λ = {value:g}</text>')
    parts.append(f'<text x="{gap}" y="{height - 10}" fill="#b00">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def build(lab: LabContext) -> None:
    import gradio as gr

    gr.Markdown("Prompt with an image (IP-Adapter). λ scales the image branch; InstantStyle keeps it only in "
                "chosen blocks (in the diagram, each cross-attention with the λ it gets).")
    with gr.Row():
        with gr.Column():
            image, _ = upload_box("style image (default: a toy scene)", toy_scene_file(lab.folder, DEFAULT_SCENE))
            knobs = {
                "style_image": image,
                "prompt": gr.Textbox(label="prompt (empty: the image prompt alone)", value=""),
                "scale": gr.Slider(0, 3, value=1.0, step=0.05, label="λ (image-branch scale)"),
                "selection": gr.Radio([ALL_LAYERS, *preset_names(lab), CHOSEN_BLOCKS], value=ALL_LAYERS,
                                      label="where the image branch runs (InstantStyle presets or chosen blocks)"),
                "blocks": gr.CheckboxGroup(block_choices(lab),
                                           label="chosen blocks (diffusers names, from the model's config)"),
                "steps": gr.Slider(1, 100, value=20, step=1, label="steps"),
                "guidance": gr.Slider(0, 15, value=5.0, step=0.5, label="guidance"),
                "seed": gr.Number(value=0, precision=0, label="seed"),
            }
            run, stop = ui.run_buttons()
        with gr.Column():
            picture = gr.HTML(diagram(lab), label="the UNet's blocks")
            shown = {"image": ui.image("generated")}
            shown.update(ui.result_panel())

    selection = [knobs["scale"], knobs["selection"], knobs["blocks"]]
    for knob in selection:
        knob.change(lambda s, sel, b: diagram(lab, s, sel, b), selection, picture, **ui.PRIVATE)
    ui.wire(lab, run, stop, handle, knobs, shown)
