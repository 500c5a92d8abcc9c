"""Image grids for samples: ``diffusers.utils.make_image_grid`` plus nearest-neighbour upscaling and text labels."""

from __future__ import annotations

import math

from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

from conditioner.errors import CondvecError

_CHAR_WIDTH, _LINE_HEIGHT = 7, 12  # Pillow's default bitmap font, in pixels


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Enlarge an image by an integer factor with nearest-neighbour sampling (every pixel becomes a square block).

    Args:
        image (`PIL.Image.Image`): the image.
        factor (`int`): the scale factor, >= 1; 1 returns the image itself.

    Returns:
        `PIL.Image.Image`: the enlarged image.

    Raises:
        CondvecError: ``factor`` is not an integer >= 1.
    """
    if not isinstance(factor, int) or factor < 1:
        raise CondvecError(f"upscale factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def image_grid(images: list[Image.Image], cols: int | None = None, upscale_by: int = 1) -> Image.Image:
    """Images in one grid, row by row (near-square by default); empty cells of the last row stay white.

    Args:
        images (`list[PIL.Image.Image]`): images of one size.
        cols (`int`, *optional*): columns; defaults to ``ceil(sqrt(len(images)))``.
        upscale_by (`int`, defaults to 1): nearest-neighbour upscale factor applied to every image first.

    Returns:
        `PIL.Image.Image`: the grid.
    """
    if not images:
        raise CondvecError("image_grid needs at least one image")
    images = [upscale(image, upscale_by) for image in images]
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  title: str | None = None, upscale: int = 1) -> Image.Image:
    """Images in a grid with a text label per row (left), per column (top) and an optional title.

    The images sit in the bottom-right corner of the result exactly as ``make_image_grid`` places them (after
    upscaling); labels are drawn in the white margins above and to the left.

    Args:
        rows (`list[list[PIL.Image.Image]]`): one list of images per row, all of one size; a shorter row is padded
            with white cells.
        row_labels (`list[str]`): one label per row (long labels wrap).
        col_labels (`list[str]`): one label per column.
        title (`str`, *optional*): a heading above the column labels.
        upscale (`int`, defaults to 1): nearest-neighbour upscale factor for tiny images.

    Returns:
        `PIL.Image.Image`: the labelled grid.

    Raises:
        CondvecError: no images, or as many labels as rows are not given.
    """
    if not rows or not rows[0]:
        raise CondvecError("labelled_grid needs at least one row with one image")
    if len(row_labels) != len(rows):
        raise CondvecError(f"labelled_grid: {len(row_labels)} row labels for {len(rows)} rows")
    cols = max(len(row) for row in rows)
    scaled = [_upscale(image, upscale) for row in rows for image in row]
    w, h = scaled[0].size
    blank = Image.new("RGB", (w, h), "white")
    cells, k = [], 0
    for row in rows:
        cells += scaled[k:k + len(row)] + [blank] * (cols - len(row))
        k += len(row)
    body = make_image_grid(cells, rows=len(rows), cols=cols)

    font = ImageFont.load_default()
    label_w = max(90, min(260, _CHAR_WIDTH * max((len(s) for s in row_labels), default=0) + 12))
    head = 16 + (16 if title else 0)
    grid = Image.new("RGB", (label_w + body.width, head + body.height), "white")
    grid.paste(body, (label_w, head))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for j, label in enumerate(col_labels[:cols]):
        draw.text((label_w + j * w + 4, head - 14), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        lines = _wrap(label, max(8, (label_w - 8) // _CHAR_WIDTH))
        for n, line in enumerate(lines[: max(1, h // _LINE_HEIGHT)]):
            draw.text((4, head + i * h + 4 + _LINE_HEIGHT * n), line, fill="black", font=font)
    return grid


_upscale = upscale  # labelled_grid's argument of the same name shadows the function


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
