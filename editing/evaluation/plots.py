"""Pictures for the report, drawn with PIL alone: scatter/line plots with interval whiskers, and labelled image
grids. Small and plain on purpose; the numbers are in the Markdown table beside them."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font():
    return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def tradeoff_plot(series: list[dict], x_label: str, y_label: str, title: str, size=(700, 480)) -> Image.Image:
    """``series``: [{"label", "points": [(x, x_lo, x_hi, y, y_lo, y_hi, point label)]}]; each series is drawn
    as a line through its points in order, with 95% interval whiskers on both axes."""
    width, height = size
    left, right, top, bottom = 70, 230, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    xs = [v for s in series for p in s["points"] for v in p[0:3] if math.isfinite(v)]
    ys = [v for s in series for p in s["points"] for v in p[3:6] if math.isfinite(v)]
    if not xs or not ys:
        draw.text((left, top), f"{title}: no data", fill="black", font=font)
        return image
    pad = lambda lo, hi: (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
    (x0, x1), (y0, y1) = pad(min(xs), max(xs)), pad(min(ys), max(ys))
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _ticks(x0, x1):
        draw.line([px(tick), height - bottom, px(tick), height - bottom + 4], fill="black")
        draw.text((px(tick) - 12, height - bottom + 6), f"{tick:.3g}", fill="black", font=font)
    for tick in _ticks(y0, y1):
        draw.line([left - 4, py(tick), left, py(tick)], fill="black")
        draw.text((left - 45, py(tick) - 5), f"{tick:.3g}", fill="black", font=font)
    draw.text((left + 5, 10), title, fill="black", font=font)
    draw.text(((width - right + left) / 2 - 40, height - 18), x_label, fill="black", font=font)
    draw.text((5, top - 25), y_label, fill="black", font=font)
    for index, s in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [(px(p[0]), py(p[3])) for p in s["points"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (x, xl, xh, y, yl, yh, label), (cx, cy) in zip(s["points"], points):
            if math.isfinite(xl) and math.isfinite(xh):
                draw.line([px(xl), cy, px(xh), cy], fill=colour)
            if math.isfinite(yl) and math.isfinite(yh):
                draw.line([cx, py(yl), cx, py(yh)], fill=colour)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            if label:
                draw.text((cx + 5, cy - 12), label, fill=colour, font=font)
        key_y = top + 15 * index
        draw.rectangle([width - right + 10, key_y + 3, width - right + 18, key_y + 11], fill=colour)
        draw.text((width - right + 22, key_y), s["label"][-36:], fill="black", font=font)
    return image


def image_grid(cells: list[list[Image.Image | None]], row_labels: list[str], column_labels: list[str],
               title: str, tile: int = 96) -> Image.Image:
    """Images in rows and columns, each resized to ``tile`` pixels, labels above the columns and left of the rows."""
    label_w, label_h, gap = 150, 30, 4
    rows, columns = len(cells), max(len(r) for r in cells)
    width = label_w + columns * (tile + gap)
    height = 20 + label_h + rows * (tile + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((5, 4), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        for line, text in enumerate(_wrap(label, tile)):
            draw.text((label_w + c * (tile + gap), 20 + 10 * line), text, fill="black", font=font)
    for r, row in enumerate(cells):
        y = 20 + label_h + r * (tile + gap)
        for line, text in enumerate(_wrap(row_labels[r], label_w - 5)):
            draw.text((5, y + 10 * line), text, fill="black", font=font)
        for c, cell in enumerate(row):
            if cell is not None:
                image.paste(cell.convert("RGB").resize((tile, tile), Image.NEAREST), (label_w + c * (tile + gap), y))
    return image


def _wrap(text: str, pixels: int) -> list[str]:
    chars = max(4, pixels // 6)
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return (lines + [line])[:3]
