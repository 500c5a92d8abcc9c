"""Loss-curve PNG and labelled sample grids, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont


def _font():
    return ImageFont.load_default()


def loss_plot(steps: list[int], losses: list[float], path: str, title: str = "training loss",
              smoothing: float = 0.9, width: int = 720, height: int = 360) -> None:
    """Write a loss curve: raw values in light grey, an exponential moving average in blue, log-scaled y axis.

    Args:
        steps (`list[int]`): x values.
        losses (`list[float]`): y values (> 0).
        path (`str`): output PNG.
        title (`str`, defaults to `"training loss"`): heading.
        smoothing (`float`, defaults to 0.9): EMA factor of the smoothed line.
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    left, right, top, bottom = 64, 16, 28, 40
    draw.text((left, 8), title, fill="black", font=font)
    pts = [(s, v) for s, v in zip(steps, losses) if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        draw.text((left, height // 2), "not enough points yet", fill="black", font=font)
        image.save(path)
        return
    xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
    y0, y1 = min(ys), max(ys)
    pad = max(y1 - y0, 1e-6) * 0.05
    to_px = _frame(draw, (left, top, width - right, height - bottom), (min(xs), max(xs)), (y0 - pad, y1 + pad),
                   y_label=lambda y: f"{10 ** y:.3g}")
    draw.text((width // 2 - 10, height - 14), "step", fill="black", font=font)
    draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=(200, 200, 200), width=1)
    smooth, acc = [], ys[0]
    for y in ys:
        acc = smoothing * acc + (1 - smoothing) * y
        smooth.append(acc)
    draw.line([to_px(x, y) for x, y in zip(xs, smooth)], fill=(31, 119, 180), width=2)
    image.save(path)


def _frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x_range: tuple[float, float],
           y_range: tuple[float, float], y_label=lambda y: f"{y:.3g}", x_ticks: list[float] | None = None,
           grid: bool = False):
    """Draw the plot box with 5 labelled y ticks (and grid lines) and x ticks (5 evenly spaced unless given).

    Returns the data → pixel mapping.
    """
    font = _font()
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x_range, y_range
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), top + (1 - (y - y0) / (y1 - y0)) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        if grid and 0 < i < 4:
            draw.line([left + 1, py, right - 1, py], fill=(230, 230, 230))
        draw.text((4, py - 6), y_label(y), fill="black", font=font)
    for x in x_ticks if x_ticks is not None else [x0 + (x1 - x0) * i / 4 for i in range(5)]:
        px, _ = to_px(x, y0)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 10, bottom + 8), f"{x:g}" if x_ticks is not None else f"{int(round(x))}", fill="black",
                  font=font)
    return to_px


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  title: str | None = None) -> Image.Image:
    """Images in a grid with a text label per row (left) and per column (top)."""
    font = _font()
    w, h = rows[0][0].size
    label_w = max(90, min(260, 7 * max((len(s) for s in row_labels), default=0) + 12))
    head = 16 + (16 if title else 0)
    grid = Image.new("RGB", (label_w + w * len(rows[0]), head + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * w + 4, head - 14), label, fill="black", font=font)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        lines = _wrap(label, max(8, (label_w - 8) // 7))
        for k, line in enumerate(lines[: max(1, h // 12)]):
            draw.text((4, head + i * h + 4 + 12 * k), line, fill="black", font=font)
        for j, image in enumerate(images):
            grid.paste(image, (label_w + j * w, head + i * h))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def curves_plot(series: dict[str, tuple[list[float], list[float]]], path: str, title: str = "",
                xlabel: str = "step", ylabel: str = "", y_range: tuple[float, float] | None = None,
                width: int = 720, height: int = 400) -> None:
    """Write several labelled curves on shared linear axes, with a legend, to a PNG.

    Args:
        series (`dict[str, tuple[list[float], list[float]]]`): legend label → (x values, y values).
        path (`str`): output PNG.
        title (`str`): heading.
        xlabel, ylabel (`str`): axis labels.
        y_range (`tuple[float, float]`, *optional*): fixed y axis; defaults to the data's range.
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    left, right, top, bottom = 64, 170, 28, 40
    draw.text((left, 8), title, fill="black", font=font)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not points:
        draw.text((left, height // 2), "no points", fill="black", font=font)
        image.save(path)
        return
    y_range = y_range or (min(p[1] for p in points), max(p[1] for p in points))
    xs_all = sorted({x for x, _ in points})
    to_px = _frame(draw, (left, top, width - right, height - bottom), (xs_all[0], xs_all[-1]), y_range,
                   x_ticks=xs_all if len(xs_all) <= 8 else None, grid=True)
    draw.text((width // 2 - 40, height - 14), xlabel, fill="black", font=font)
    draw.text((4, top - 18), ylabel, fill="black", font=font)
    for k, (label, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [to_px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 4 + 16 * k
        draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=2)
        draw.text((width - right + 36, ly), label, fill="black", font=font)
    image.save(path)
