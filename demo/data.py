"""Deterministic demo images with tag captions, for training and measuring tag binding.

Every image shows one or two flat-coloured objects on a plain background. The attributes are drawn independently,
so a model has to bind each attribute to the right object; the captions use object-level tags so that binding
(``red circle`` makes a red circle) and bleeding (``red circle, blue square`` makes a red square) can be measured
with :mod:`demo.detector`.

Dataset layout (what the trainer reads)::

    OUT_DIR/00000.png           the image, RGB, SIZE x SIZE pixels (SIZE is 32 or 64)
    OUT_DIR/00000.txt           its caption: comma-separated tags, one line
    OUT_DIR/ground_truth.jsonl  one JSON object per image, in file order

Attributes:

- shape: ``circle``, ``square``, ``triangle`` (isosceles, pointing up)
- colour: ``red``, ``green``, ``blue``, ``yellow``, ``magenta``, ``cyan`` (pure RGB primaries and secondaries)
- size: ``small`` (a quarter of the image side) or ``large`` (7/16 of the image side)
- position: ``left`` or ``right`` in a two-object image (always one object on each side); ``left``, ``center`` or
  ``right`` (third of the image holding the object's centre) in a one-object image. The vertical position varies a
  little and has no tag.
- background: ``black``, ``white``, ``gray``

Tags (the complete vocabulary; every caption uses only these):

- ``{colour} {shape}``, one per object, e.g. ``red circle``: the object with that shape has that colour.
- ``{size} {shape}``, one per object, e.g. ``large circle``: the object with that shape has that size.
- ``{shape} on {position}``, one per object, e.g. ``circle on left``: the object with that shape is on that side.
- ``{background} background``, one per image, e.g. ``gray background``.
- ``two objects``, only in images with two objects; a one-object image has no count tag.

Tags within a caption are shuffled (deterministically, from the seed) because their order carries no meaning.
A tag that would appear twice (two large circles give ``large circle`` twice) is written once, as the prompt
parser in :mod:`conditioner.parse` would merge it anyway.

When both objects have the same shape they always differ in colour (such images are drawn again otherwise), so
the two ``{colour} {shape}`` tags still tell the objects apart. The ``{size} {shape}`` and ``{shape} on
{position}`` tags of that shape then hold for one object each but the caption alone does not say which; the
exact binding is in ``ground_truth.jsonl``.

Each ``ground_truth.jsonl`` record is::

    {"file_name": "00000.png", "image_size": 32, "background": "gray",
     "objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "left",
                  "box": [1, 9, 15, 23]}, ...],
     "tags": ["red circle", ...], "caption": "red circle, ..."}

``objects`` are ordered left to right and ``box`` is ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive). Concept
records (:func:`generate_concept_dataset`) also have ``"concept": TAG``.

Rendering is done on a 4x supersampled canvas and box-filtered down, with every object's box on whole output
pixels: object interiors keep their exact palette colour and only the edge pixels are blends with the
background, which keeps colours, areas and bounding boxes easy to measure.

Same arguments and seed give byte-identical files. Command line::

    python -m demo.data OUT_DIR --num 1000 [--size 32] [--seed 0] [--two-object-prob 0.5]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conditioner.cli_errors import OneLineArgumentParser, run_cli
from conditioner.errors import CondvecError

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
POSITIONS_ONE = ("left", "center", "right")
POSITIONS_TWO = ("left", "right")
IMAGE_SIZES = (32, 64)
TWO_OBJECTS_TAG = "two objects"

# Object side lengths per 32 pixels of image side. Small and large differ by almost a factor of two so that size is
# never confused with shape (a large triangle covers more pixels than a small square, but its box is far wider).
_SIDE_PER_32 = {"small": 8, "large": 14}
_SUPERSAMPLE = 4
# Sanity bound on redraws when the caller's ``exclude`` keeps rejecting samples.
_MAX_REDRAWS = 1000


def tag_vocabulary() -> list[str]:
    """Every tag a demo caption can contain.

    Returns:
        `list[str]`: the tags in a fixed order (object tags, then position, background and count tags).
    """
    tags = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    tags += [f"{z} {s}" for s in SHAPES for z in SIZES]
    tags += [f"{s} on {p}" for s in SHAPES for p in POSITIONS_ONE]
    tags += [f"{b} background" for b in BACKGROUNDS]
    tags.append(TWO_OBJECTS_TAG)
    return tags


def object_tags(obj: dict) -> list[str]:
    """The three tags that describe one object.

    Args:
        obj (`dict`): an object with ``shape``, ``colour``, ``size`` and ``position``.

    Returns:
        `list[str]`: ``[colour shape, size shape, shape on position]``.
    """
    shape = obj["shape"]
    return [f"{obj['colour']} {shape}", f"{obj['size']} {shape}", f"{shape} on {obj['position']}"]


def _check_size(size: int) -> None:
    if size not in IMAGE_SIZES:
        raise CondvecError(f"image size must be 32 or 64, got {size}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise CondvecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _side(size_name: str, image_size: int) -> int:
    return _SIDE_PER_32[size_name] * image_size // 32


def _span(lo: int, hi: int, want_lo: int, want_hi: int) -> tuple[int, int]:
    """Clamp the wanted range [want_lo, want_hi] into [lo, hi]; collapse to the nearest point if it falls outside."""
    a, b = max(lo, want_lo), min(hi, want_hi)
    if a > b:
        a = b = min(max(want_lo, lo), hi)
    return a, b


def _place(objects: list[dict], image_size: int, rng: np.random.Generator | None) -> None:
    """Give every object a ``box``; with ``rng=None`` the box is the centred, jitter-free layout.

    Horizontal centres aim at 1/4, 1/2 and 3/4 of the width (left, center, right) with up to 1/16 of the width of
    jitter, which keeps a one-object image's centre inside its third. In a two-object image each object stays in
    its own half with a gap of at least 1/16 of the width between them, so objects never touch or overlap.
    """
    s = image_size
    margin = s // 32
    gap = s // 16
    jitter = s // 16
    two = len(objects) == 2
    for obj in objects:
        d = _side(obj["size"], s)
        centre = {"left": s // 4, "center": s // 2, "right": 3 * s // 4}[obj["position"]]
        if not two:
            lo, hi = margin, s - margin - d
        elif obj["position"] == "left":
            lo, hi = margin, s // 2 - gap // 2 - d
        else:
            lo, hi = s // 2 + gap // 2, s - margin - d
        x_lo, x_hi = _span(lo, hi, centre - d // 2 - jitter, centre - d // 2 + jitter)
        y_lo, y_hi = _span(margin, s - margin - d, s // 2 - d // 2 - s // 8, s // 2 - d // 2 + s // 8)
        if rng is None:
            x0 = min(max(centre - d // 2, x_lo), x_hi)
            y0 = min(max(s // 2 - d // 2, y_lo), y_hi)
        else:
            x0 = int(rng.integers(x_lo, x_hi + 1))
            y0 = int(rng.integers(y_lo, y_hi + 1))
        obj["box"] = [x0, y0, x0 + d, y0 + d]


def render(record: dict, size: int = 32) -> Image.Image:
    """Render a ground-truth record (or any attribute spec in that format) as an image.

    Args:
        record (`dict`): ``{"background": ..., "objects": [{"shape", "colour", "size", "position"}, ...]}``.
            Objects may carry a ``box`` (``[x0, y0, x1, y1]`` in pixels of ``record["image_size"]``, 32 when
            absent); objects without one get the centred, jitter-free layout for their position.
        size (`int`, defaults to 32): image side in pixels, 32 or 64.

    Returns:
        `PIL.Image.Image`: an RGB image of ``size`` x ``size`` pixels.

    Raises:
        `CondvecError`: for an unknown attribute value, a bad size or a wrong number of objects.
    """
    _check_size(size)
    _check_choice("background", record.get("background"), tuple(BACKGROUNDS))
    objects = [dict(o) for o in record.get("objects", [])]
    if len(objects) not in (1, 2):
        raise CondvecError(f"a record must have 1 or 2 objects, got {len(objects)}")
    for obj in objects:
        _check_choice("shape", obj.get("shape"), SHAPES)
        _check_choice("colour", obj.get("colour"), tuple(COLOURS))
        _check_choice("size", obj.get("size"), SIZES)
        _check_choice("position", obj.get("position"), POSITIONS_ONE if len(objects) == 1 else POSITIONS_TWO)
    if len(objects) == 2 and objects[0]["position"] == objects[1]["position"]:
        raise CondvecError("two objects must be one on the left and one on the right")
    if any("box" not in o for o in objects):
        _place(objects, size, rng=None)
    else:
        # Boxes recorded at another resolution scale exactly between 32 and 64 pixels.
        scale = size / int(record.get("image_size", 32))
        for obj in objects:
            obj["box"] = [round(v * scale) for v in obj["box"]]

    ss = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * ss, size * ss), BACKGROUNDS[record["background"]])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x0, y0, x1, y1 = (v * ss for v in obj["box"])
        fill = COLOURS[obj["colour"]]
        # PIL's boxes include their last pixel, hence the -1 on the far edges.
        if obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    # A box filter averages whole supersampled blocks: interiors stay exactly the palette colour, unlike
    # Lanczos or bicubic, which ring and would tint the pixels next to an edge.
    return canvas.resize((size, size), Image.BOX)


def _caption(tags: list[str], rng: np.random.Generator) -> tuple[list[str], str]:
    unique = list(dict.fromkeys(tags))
    order = rng.permutation(len(unique))
    shuffled = [unique[i] for i in order]
    return shuffled, ", ".join(shuffled)


def _sample_objects(rng: np.random.Generator, two: bool) -> list[dict]:
    def one(position: str) -> dict:
        return {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": tuple(COLOURS)[rng.integers(len(COLOURS))],
            "size": SIZES[rng.integers(len(SIZES))],
            "position": position,
        }

    if not two:
        return [one(POSITIONS_ONE[rng.integers(len(POSITIONS_ONE))])]
    while True:
        left, right = one("left"), one("right")
        # Same shape and same colour would leave two identical "{colour} {shape}" tags: draw again.
        if left["shape"] != right["shape"] or left["colour"] != right["colour"]:
            return [left, right]


def _file_stem(index: int, total: int) -> str:
    return f"{index:0{max(5, len(str(total - 1)))}d}"


def _write(out: Path, records: list[dict], images: list[Image.Image]) -> None:
    for record, image in zip(records, images):
        image.save(out / record["file_name"], format="PNG")
        (out / record["file_name"]).with_suffix(".txt").write_text(record["caption"] + "\n", encoding="utf-8")
    with open(out / "ground_truth.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def generate_demo_dataset(
    out_dir: str | Path,
    num_images: int,
    size: int = 32,
    seed: int = 0,
    two_object_prob: float = 0.5,
    exclude: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """Write a demo dataset: ``NAME.png`` + ``NAME.txt`` pairs and ``ground_truth.jsonl``.

    Args:
        out_dir (`str` or `Path`): output folder, created if missing; files of the same names are overwritten.
        num_images (`int`): number of images, >= 1.
        size (`int`, defaults to 32): image side in pixels, 32 or 64.
        seed (`int`, defaults to 0): random seed; the same arguments and seed give byte-identical files.
        two_object_prob (`float`, defaults to 0.5): probability that an image has two objects, in [0, 1].
        exclude (`Callable[[dict], bool]`, *optional*): called with each candidate record (the full record as
            it would be written); a sample for which it returns `True` is replaced by a new draw,
            e.g. ``lambda r: "yellow triangle" in r["tags"]`` holds a concept out of the data.

    Returns:
        `list[dict]`: the ground-truth records, in file order (as written to ``ground_truth.jsonl``).

    Raises:
        `CondvecError`: for a bad argument, or when ``exclude`` rejects 1000 draws in a row.
    """
    _check_size(size)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise CondvecError(f"number of images must be an integer >= 1, got {num_images!r}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise CondvecError(f"two-object probability must be in [0, 1], got {two_object_prob}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    records, images = [], []
    for index in range(num_images):
        for _ in range(_MAX_REDRAWS):
            two = bool(rng.random() < two_object_prob)
            objects = _sample_objects(rng, two)
            background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            tags = [t for obj in objects for t in object_tags(obj)] + [f"{background} background"]
            if two:
                tags.append(TWO_OBJECTS_TAG)
            tags, caption = _caption(tags, rng)
            _place(objects, size, rng)
            record = {
                "file_name": _file_stem(index, num_images) + ".png",
                "image_size": size,
                "background": background,
                "objects": objects,
                "tags": tags,
                "caption": caption,
            }
            if exclude is None or not exclude(record):
                break
        else:
            raise CondvecError(f"exclude rejected {_MAX_REDRAWS} draws in a row; it seems to exclude everything")
        records.append(record)
        images.append(render(record, size))
    _write(out, records, images)
    return records


def generate_concept_dataset(
    out_dir: str | Path,
    tag: str,
    attributes: dict,
    num_images: int,
    size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Write images of one fixed object captioned with a new concept tag, to teach a model that tag.

    The captions hold the concept tag and the ``{background} background`` tag only, so the tag alone has to carry
    the object's shape, colour and size (e.g. ``mascot`` for a large yellow triangle).

    Args:
        out_dir (`str` or `Path`): output folder, created if missing; files of the same names are overwritten.
        tag (`str`): the concept tag, e.g. ``"mascot"``; non-empty, no commas.
        attributes (`dict`): ``shape``, ``colour`` and ``size`` (required), ``position`` (``left``, ``center`` or
            ``right``) and ``background`` (optional: drawn at random per image when absent).
        num_images (`int`): number of images, >= 1.
        size (`int`, defaults to 32): image side in pixels, 32 or 64.
        seed (`int`, defaults to 0): random seed; the same arguments and seed give byte-identical files.

    Returns:
        `list[dict]`: the ground-truth records, each with ``"concept": tag``.

    Raises:
        `CondvecError`: for a bad tag, attribute or argument.
    """
    _check_size(size)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise CondvecError(f"number of images must be an integer >= 1, got {num_images!r}")
    name = " ".join(str(tag).split())
    if not name or "," in name:
        raise CondvecError(f"concept tag must be non-empty and contain no comma, got {tag!r}")
    unknown = set(attributes) - {"shape", "colour", "size", "position", "background"}
    if unknown:
        raise CondvecError(f"unknown concept attributes: {', '.join(sorted(unknown))}")
    for key, choices in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES)):
        _check_choice(key, attributes.get(key), choices)
    if "position" in attributes:
        _check_choice("position", attributes["position"], POSITIONS_ONE)
    if "background" in attributes:
        _check_choice("background", attributes["background"], tuple(BACKGROUNDS))

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, images = [], []
    for index in range(num_images):
        position = attributes.get("position") or POSITIONS_ONE[rng.integers(len(POSITIONS_ONE))]
        background = attributes.get("background") or tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        obj = {k: attributes[k] for k in ("shape", "colour", "size")} | {"position": position}
        tags, caption = _caption([name, f"{background} background"], rng)
        record = {
            "file_name": _file_stem(index, num_images) + ".png",
            "image_size": size,
            "background": background,
            "objects": [obj],
            "tags": tags,
            "caption": caption,
            "concept": name,
        }
        _place(record["objects"], size, rng)
        records.append(record)
        images.append(render(record, size))
    _write(out, records, images)
    return records


def parse_concept(spec: str) -> tuple[str, dict]:
    """``"mascot=large magenta circle"`` → ``("mascot", {"size": "large", "colour": "magenta", "shape": "circle"})``.

    Raises:
        `CondvecError`: no ``=``, not one size, colour and shape, or a tag that cannot name a folder.
    """
    if "=" not in spec:
        raise CondvecError(f"concept {spec!r} must look like 'mascot=large yellow triangle'")
    tag, words = (part.strip() for part in spec.split("=", 1))
    attributes = {}
    for word in words.split():
        for key, options in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", SIZES)):
            if word in options:
                attributes[key] = word
    if len(attributes) != 3 or len(words.split()) != 3:
        raise CondvecError(f"concept {spec!r}: name a size ({', '.join(SIZES)}), a colour ({', '.join(COLOURS)}) "
                           f"and a shape ({', '.join(SHAPES)})")
    folder = tag.replace(" ", "_")
    if not folder or folder in (".", "..") or any(c in folder for c in "/\\") or ":" in folder:
        raise CondvecError(f"concept tag {tag!r} names its folder below the output folder: use a plain name (no "
                           "'/', '\\', ':' or '..')")
    return tag, attributes


def generate_concepts(out_dir: str | Path, concepts: list[str], num_images: int, size: int = 32,
                      seed: int = 0) -> list[dict]:
    """One folder per concept below ``out_dir`` (``mascot=large magenta circle`` → ``out_dir/mascot/``), each with
    ``num_images`` images of :func:`generate_concept_dataset` (seed ``seed + k`` for the k-th concept).

    Every spec is checked (:func:`parse_concept`) before anything is written.
    """
    parsed = [parse_concept(spec) for spec in concepts]
    records = []
    for k, (tag, attributes) in enumerate(parsed):
        records += generate_concept_dataset(Path(out_dir) / tag.replace(" ", "_"), tag, attributes, num_images,
                                            size=size, seed=seed + k)
    return records


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m demo.data``; returns 0, or 2 with a one-line error on bad input."""
    prog = "python -m demo.data"
    parser = OneLineArgumentParser(
        prog=prog,
        description="Write deterministic demo images with tag captions (see the module docstring for the tags).",
    )
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--num", type=int, required=True, help="number of images (>= 1)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels: 32 or 64 (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--two-object-prob", type=float, default=0.5, help="chance of two objects (default 0.5)")
    parser.add_argument("--concept", action="append", default=[], metavar="TAG=SIZE COLOUR SHAPE",
                        help="instead of scenes, --num images of one fixed object captioned TAG, in OUT_DIR/TAG/ "
                             "(repeatable), e.g. --concept 'mascot=large magenta circle'")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when OUT_DIR already exists")

    def run() -> int:
        args = parser.parse_args(argv)
        if args.if_missing and os.path.exists(args.out_dir):
            print(f"{args.out_dir} exists: nothing written")
            return 0
        if args.concept:
            records = generate_concepts(args.out_dir, args.concept, args.num, size=args.size, seed=args.seed)
        else:
            records = generate_demo_dataset(
                args.out_dir, args.num, size=args.size, seed=args.seed, two_object_prob=args.two_object_prob
            )
        print(f"wrote {len(records)} images to {args.out_dir}")
        return 0

    return run_cli(prog, run)


if __name__ == "__main__":
    sys.exit(main())
