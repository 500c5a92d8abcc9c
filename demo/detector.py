"""Classical attribute detector for the demo images of :mod:`demo.data` (numpy only, nothing learned).

It reads an image back into the attributes its caption names, so generated images can be scored tag by tag:

1. background: the palette background nearest to the median of the border pixels (objects keep a margin, so the
   border is background);
2. objects: 8-connected components of pixels that differ from the background, dropping specks of a few pixels;
3. per object:
   - colour: the palette colour nearest to the mean of its core pixels (those farthest from the background, i.e.
     fully covered, as edge pixels are blends with the background);
   - coverage: each pixel's fraction of object colour, from projecting it onto the background→colour line, which
     gives an anti-aliasing-aware area;
   - shape: the ideal square, circle or upward triangle with the object's area and centroid that overlaps its
     coverage best (soft intersection over union), which tolerates ragged edges and stray pixels;
   - size: that fitted shape's side relative to the image side (small 1/4, large 7/16);
   - position: left or right by order when there are two objects (they are always on opposite sides), otherwise
     the third of the image holding the coverage-weighted centroid.

Validation on fresh data::

    python -m demo.detector --num 2000 [--sizes 32 64] [--seed 1]
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from conditioner.cli_errors import OneLineArgumentParser, UsageError, run_cli
from conditioner.errors import CondvecError
from demo.data import BACKGROUNDS, COLOURS, IMAGE_SIZES, generate_demo_dataset

ATTRIBUTES = ("shape", "colour", "size", "position")
_POSITION_ORDER = {"left": 0, "center": 1, "right": 2}

_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float64)
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[n] for n in _COLOUR_NAMES], dtype=np.float64)

# A pixel belongs to an object when it is this far (RGB Euclidean, 0-255 scale) from the background. Every palette
# colour is at least ~220 from every background, so this keeps edge pixels down to ~10% coverage.
_FOREGROUND_DISTANCE = 24.0
# Components smaller than this many pixels per (32 px)^2 of image are specks, not objects; the smallest object
# (a small triangle) covers about 32.
_SPECK_PIXELS_PER_32 = 6
# Core pixels are those at least this fraction of the component's largest distance from the background.
_CORE_FRACTION = 0.9
# Area of each shape relative to its bounding square (the generator draws every shape in a square box).
_AREA_FACTOR = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
# Sub-pixel samples per pixel side when rasterising shape templates.
_TEMPLATE_SUPERSAMPLE = 4
# Fitted side / image side between small (0.25) and large (0.4375).
_LARGE_MIN_EXTENT = 0.34


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise CondvecError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3].astype(np.float64)
    # Float images in [0, 1] (e.g. decoded model outputs) are put on the 0-255 scale the palette uses.
    if np.issubdtype(np.asarray(image).dtype, np.floating) and arr.max(initial=0.0) <= 1.0:
        arr = arr * 255.0
    return arr


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (row, col)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr in (r - 1, r, r + 1):
                for cc in (c - 1, c, c + 1):
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        components.append(np.array(pixels))
    return components


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))


def _template(shape: str, cx: float, cy: float, side: float, h: int, w: int) -> np.ndarray:
    """Pixel coverage (H, W) of an ideal shape with a ``side``-wide bounding square, centroid at (cx, cy)."""
    ss = _TEMPLATE_SUPERSAMPLE
    ys = (np.arange(h * ss)[:, None] + 0.5) / ss
    xs = (np.arange(w * ss)[None, :] + 0.5) / ss
    half = side / 2
    if shape == "square":
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    elif shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    else:  # isosceles, apex up: the centroid lies two thirds of the height below the apex
        top = cy - 2 * side / 3
        inside = (ys >= top) & (ys <= top + side) & (np.abs(xs - cx) <= (ys - top) / side * half)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _fit_shape(coverage: np.ndarray, rows: np.ndarray, cols: np.ndarray, h: int, w: int) -> tuple[str, float]:
    """The shape whose ideal template (same area, same centroid) overlaps the object best, and its side in pixels.

    Overlap is the soft intersection-over-union of the coverage maps. Fitting by area and centroid rather than by
    the bounding box keeps the reading stable when a generated object has ragged edges or a stray pixel.
    """
    area = float(coverage.sum())
    mass = np.zeros((h, w))
    mass[rows, cols] = coverage
    cy = float((coverage * (rows + 0.5)).sum() / max(area, 1e-9))
    cx = float((coverage * (cols + 0.5)).sum() / max(area, 1e-9))
    best, best_iou, best_side = "circle", -1.0, 0.0
    for shape, factor in _AREA_FACTOR.items():
        side = float(np.sqrt(area / factor))
        tmpl = _template(shape, cx, cy, side, h, w)
        iou = float(np.minimum(mass, tmpl).sum() / max(np.maximum(mass, tmpl).sum(), 1e-9))
        if iou > best_iou:
            best, best_iou, best_side = shape, iou, side
    return best, best_side


def detect(image: Image.Image | np.ndarray) -> dict:
    """Detect the background and the objects of a demo image.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): an RGB image; arrays are (H, W, 3), uint8 or float in [0, 1].

    Returns:
        `dict`: ``{"background": name, "objects": [{"shape", "colour", "size", "position"}, ...]}`` with the
        objects sorted left to right (by centroid).
    """
    arr = _as_rgb_array(image)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_index = _nearest(np.median(border, axis=0), _BG_RGB)
    bg = _BG_RGB[bg_index]

    distance = np.sqrt(((arr - bg) ** 2).sum(axis=2))
    min_pixels = max(3, round(_SPECK_PIXELS_PER_32 * h * w / 32**2))
    found = []
    for pixels in _components(distance > _FOREGROUND_DISTANCE):
        if len(pixels) < min_pixels:
            continue
        rows, cols = pixels[:, 0], pixels[:, 1]
        d = distance[rows, cols]
        core = arr[rows, cols][d >= _CORE_FRACTION * d.max()]
        colour_index = _nearest(core.mean(axis=0), _COLOUR_RGB)
        # Coverage of each pixel: where it lies between the background (0) and the object colour (1).
        direction = _COLOUR_RGB[colour_index] - bg
        coverage = np.clip((arr[rows, cols] - bg) @ direction / (direction @ direction), 0.0, 1.0)
        shape, side = _fit_shape(coverage, rows, cols, h, w)
        cx = float((coverage * cols).sum() / max(coverage.sum(), 1e-9)) + 0.5
        found.append(
            {
                "shape": shape,
                "colour": _COLOUR_NAMES[colour_index],
                "size": "large" if side / max(h, w) >= _LARGE_MIN_EXTENT else "small",
                "cx": cx,
            }
        )

    found.sort(key=lambda o: o["cx"])
    for i, obj in enumerate(found):
        cx = obj.pop("cx")
        if len(found) == 2:
            obj["position"] = ("left", "right")[i]
        else:
            obj["position"] = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "center"
    return {"background": _BG_NAMES[bg_index], "objects": found}


def check_one(found: dict, want: dict, background: str) -> dict[str, bool]:
    """Score a :func:`detect` reading against a one-object spec.

    Returns ``{"one object", "background", "shape", "colour", "size", "position", "all"}`` → right or not; the
    attributes count as right only when exactly one object was found, ``all`` needs every entry.
    """
    one = len(found["objects"]) == 1
    obj = found["objects"][0] if one else {}
    right = {"one object": one, "background": found["background"] == background}
    right.update({a: obj.get(a) == want[a] for a in ATTRIBUTES})
    right["all"] = all(right.values())
    return right


def match_two(objects: Sequence[dict], wanted: Sequence[dict]) -> tuple[dict, dict]:
    """Pair two detected objects with two wanted specs, in the order that agrees on the most attributes."""
    return max(itertools.permutations(objects),
               key=lambda pair: sum(pair[i][a] == wanted[i][a] for i in range(2) for a in ATTRIBUTES))


def accuracy(records: Sequence[dict], images: Sequence[Image.Image | np.ndarray]) -> dict:
    """Score the detector's reading of images against the records they should show.

    Objects are matched left to right. When the detected object count is wrong, every object of that record counts
    as wrong on every attribute.

    Args:
        records (`Sequence[dict]`): ground-truth records (``background`` and ``objects``), e.g. from
            :func:`demo.data.generate_demo_dataset` or the prompt specs a model was asked to draw.
        images (`Sequence`): the images, in the same order.

    Returns:
        `dict`: per-image accuracies ``count``, ``background`` and ``all`` (every attribute of the image right),
        per-object accuracies ``shape``, ``colour``, ``size`` and ``position``, and the totals ``images`` and
        ``objects``.
    """
    if len(records) != len(images):
        raise CondvecError(f"got {len(records)} records but {len(images)} images")
    if not records:
        raise CondvecError("need at least one record to score")
    per_image = {"count": 0, "background": 0, "all": 0}
    per_object = dict.fromkeys(ATTRIBUTES, 0)
    n_objects = 0
    for record, image in zip(records, images):
        found = detect(image)
        truth = sorted(record["objects"], key=lambda o: _POSITION_ORDER[o["position"]])
        n_objects += len(truth)
        count_ok = len(found["objects"]) == len(truth)
        bg_ok = found["background"] == record["background"]
        per_image["count"] += count_ok
        per_image["background"] += bg_ok
        all_ok = count_ok and bg_ok
        if count_ok:
            for want, got in zip(truth, found["objects"]):
                for attr in ATTRIBUTES:
                    ok = want[attr] == got[attr]
                    per_object[attr] += ok
                    all_ok = all_ok and ok
        per_image["all"] += all_ok
    result = {k: v / len(records) for k, v in per_image.items()}
    result.update({k: v / n_objects for k, v in per_object.items()})
    result.update(images=len(records), objects=n_objects)
    return result


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float = 8.0, ragged: float = 0.3) -> np.ndarray:
    """A clean demo image made to look generated: ragged edges and pixel noise, same attributes.

    Every pixel on an edge (one whose 4-neighbourhood holds a clearly different colour) takes the colour of a
    random neighbour with probability ``ragged`` — objects lose and gain edge pixels — then Gaussian noise of std
    ``noise`` (0-255 scale) is added to every channel.
    """
    arr = _as_rgb_array(image).copy()
    h, w, _ = arr.shape
    padded = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifts = [(0, 1), (2, 1), (1, 0), (1, 2)]
    neighbours = np.stack([padded[r:r + h, c:c + w] for r, c in shifts])
    edge = (np.sqrt(((neighbours - arr) ** 2).sum(axis=3)) > _FOREGROUND_DISTANCE).any(axis=0)
    flip = edge & (rng.random((h, w)) < ragged)
    pick = rng.integers(0, len(shifts), size=(h, w))
    arr[flip] = neighbours[pick[flip], np.nonzero(flip)[0], np.nonzero(flip)[1]]
    arr += rng.normal(0.0, noise, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def validate(num_images: int, size: int, seed: int = 1, degraded: bool = False) -> dict:
    """Generate a fresh demo dataset in a temporary folder and score the detector on its PNG files.

    Args:
        num_images (`int`): number of images.
        size (`int`): image side, 32 or 64.
        seed (`int`, defaults to 1): generator seed.
        degraded (`bool`, defaults to `False`): score copies made by :func:`degrade` (ragged edges, noise).

    Returns:
        `dict`: the result of :func:`accuracy`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        records = generate_demo_dataset(tmp, num_images, size=size, seed=seed)
        images = [np.asarray(Image.open(Path(tmp) / r["file_name"]).convert("RGB")) for r in records]
    if degraded:
        rng = np.random.default_rng(seed)
        images = [degrade(im, rng) for im in images]
    return accuracy(records, images)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m demo.detector``; returns 0, or 2 with a one-line error on bad input."""
    prog = "python -m demo.detector"
    parser = OneLineArgumentParser(prog=prog,
                                   description="Validate the attribute detector on freshly generated demo images.")
    parser.add_argument("--num", type=int, default=2000, help="images per size (default 2000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (default 32 64)")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    parser.add_argument("--degraded", action="store_true", help="also score copies with ragged edges and noise")

    def run() -> int:
        args = parser.parse_args(argv)
        if args.num < 1:
            raise UsageError(f"--num must be >= 1, got {args.num}")
        if any(size not in IMAGE_SIZES for size in args.sizes):
            raise UsageError(f"--sizes must be 32 and/or 64, got {' '.join(map(str, args.sizes))}")
        keys = ("count", "background", *ATTRIBUTES, "all")
        print(f"{'size':>4} {'images':>6} {'objects':>7} " + " ".join(f"{k:>10}" for k in keys))
        for size in args.sizes:
            for degraded in (False, True) if args.degraded else (False,):
                result = validate(args.num, size, seed=args.seed, degraded=degraded)
                print(f"{size:>4} {result['images']:>6} {result['objects']:>7} "
                      + " ".join(f"{result[k]:>10.4f}" for k in keys) + ("  degraded" if degraded else ""))
        return 0

    return run_cli(prog, run)


if __name__ == "__main__":
    sys.exit(main())
