"""A labelled grid of edits over text and image guidance scales (the paper's Fig. 4-style ablation).

Columns are text scales s_T, rows image scales s_I; a label row and a label column name each scale, and the
input image has a column of its own:

            | input | s_T=5 | s_T=7.5 | s_T=10
    s_I=1   | image | edit  |  edit   |  edit
    s_I=1.5 |       | edit  |  edit   |  edit
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def format_scale(value: float) -> str:
    """7.5 -> "7.5", 10.0 -> "10": the shortest exact form, for labels and file names."""
    return f"{value:g}"


def parse_scales(text: str, option: str) -> list[float]:
    """"5,7.5,10" -> [5.0, 7.5, 10.0]; a one-line error for anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} {text!r}: give comma-separated numbers, e.g. {option} 5,7.5,10")
    return values


def _label(size: tuple[int, int], text: str, font) -> Image.Image:
    """A white tile with ``text`` centred on it."""
    tile = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(tile)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top), text, fill=INK, font=font)
    return tile


def labelled_grid(cells: list[list[Image.Image]], text_scales: list[float], image_scales: list[float],
                  input_image: Image.Image | None = None) -> Image.Image:
    """``cells[r][c]`` is the edit at image scale ``image_scales[r]`` and text scale ``text_scales[c]``; the
    input image, if given, gets a column of its own (first row)."""
    if len(cells) != len(image_scales) or any(len(row) != len(text_scales) for row in cells):
        raise ValueError(f"cells must be {len(image_scales)} rows of {len(text_scales)} images")
    width, height = cells[0][0].size
    font = ImageFont.load_default(size=max(8, min(width, height) // 6))
    header, margin = max(16, height // 4), max(48, width)  # label row height / label column width
    columns = [("input", None)] if input_image is not None else []
    columns += [(f"s_T={format_scale(s)}", c) for c, s in enumerate(text_scales)]
    grid = Image.new("RGB", (margin + width * len(columns), header + height * len(image_scales)), BACKGROUND)
    for k, (title, _) in enumerate(columns):
        grid.paste(_label((width, header), title, font), (margin + k * width, 0))
    for r, s_image in enumerate(image_scales):
        top = header + r * height
        grid.paste(_label((margin, height), f"s_I={format_scale(s_image)}", font), (0, top))
        for k, (_, c) in enumerate(columns):
            if c is not None:
                grid.paste(cells[r][c], (margin + k * width, top))
            elif r == 0:
                grid.paste(input_image.convert("RGB").resize((width, height)), (margin + k * width, top))
    return grid
