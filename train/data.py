"""The training dataset: scanning images and captions, aspect-ratio buckets, image loading and per-epoch batches.

Dataset layouts (see :func:`scan_dataset`)::

    ROOT/a.png, ROOT/a.txt                        sidecar captions, searched recursively
    ROOT/10_mascot/b.png, ROOT/10_mascot/b.txt    kohya repeat folder: its images count 10 times per epoch
    ROOT/metadata.jsonl                           {"file_name": "a.png", "text": "tag1, tag2"} per line

A caption is comma-separated tags, parsed later by :func:`conditioner.parse.parse_prompt`; an empty caption is an
unconditional sample.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees: the displayed image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_JSONL_EXAMPLE = '{"file_name": "a.png", "text": "tag1, tag2"}'
_MAX_LISTED = 3


@dataclass
class Item:
    """One training image.

    Args:
        path (`str`): absolute image path.
        caption (`str`): raw caption text (comma-separated tags), not yet parsed; may be empty.
        repeats (`int`): how many times the item appears per epoch, >= 1.
        width (`int`): image width in pixels as displayed (EXIF rotation applied), read from the file header.
        height (`int`): image height in pixels, as ``width``.
        bucket (`tuple[int, int]`, defaults to `(0, 0)`): ``(width, height)`` training resolution, set by
            :func:`assign_buckets`.
    """

    path: str
    caption: str
    repeats: int
    width: int
    height: int
    bucket: tuple[int, int] = (0, 0)


# ---------------------------------------------------------------------------------------------------- scanning


def _find_images(root: Path) -> list[str]:
    """Relative POSIX paths of all images below ``root``, sorted; hidden folders (``.cache``, ``.git``) skipped."""
    found = []
    seen_dirs = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a symlink loop
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = Path(folder).relative_to(root)
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append((rel_folder / name).as_posix())
    return sorted(found)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _sidecar_captions(root: Path, images: list[str], caption_ext: str) -> tuple[dict[str, str], list[str]]:
    captions, missing = {}, []
    for rel in images:
        sidecar = (root / rel).with_suffix(caption_ext)
        if sidecar.is_file():
            captions[rel] = _read_text(sidecar, "caption file").strip()
        else:
            missing.append(rel)
    return captions, missing


def _normalize_rel(path: str) -> str:
    """``./a\\b/`` -> ``a/b``; the root itself is ``"."``."""
    return PurePosixPath(path.strip().replace("\\", "/")).as_posix().strip("/") or "."


def _jsonl_captions(root: Path, images: list[str]) -> tuple[dict[str, str], list[str]]:
    jsonl = root / METADATA_FILE
    if not jsonl.is_file():
        raise FileNotFoundError(
            f"{jsonl} not found; write one line {_JSONL_EXAMPLE} per image there, or use metadata='sidecar'"
        )
    known = set(images)
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(jsonl, "metadata file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be like {_JSONL_EXAMPLE}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object like {_JSONL_EXAMPLE}, got {type(record).__name__}")
        for key in ("file_name", "text"):
            if key not in record:
                raise ValueError(f"{where}: missing key {key!r}; each line must be like {_JSONL_EXAMPLE}")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        rel = _normalize_rel(record["file_name"])
        if rel in first_line:
            raise ValueError(f"{where}: file_name {record['file_name']!r} is already listed on line {first_line[rel]}")
        if rel not in known:
            if not (root / rel).is_file():
                raise ValueError(f"{where}: file_name {record['file_name']!r} does not exist in {root}")
            raise ValueError(f"{where}: file_name {record['file_name']!r} is not an image with one of the extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        first_line[rel] = lineno
        captions[rel] = record["text"].strip()
    return captions, [rel for rel in images if rel not in captions]


def _folders(images: list[str]) -> list[str]:
    """Every folder (relative POSIX path) that holds an image or a folder with images; the root excluded."""
    out = set()
    for rel in images:
        parent = PurePosixPath(rel).parent
        while parent.as_posix() != ".":
            out.add(parent.as_posix())
            parent = parent.parent
    return sorted(out)


def _check_repeat_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _repeats_of(rel: str, explicit: dict[str, int], default_repeats: int) -> int:
    parents = [p.as_posix() for p in PurePosixPath(rel).parents]  # innermost first, ending with "."
    for folder in parents:
        if folder in explicit:
            return explicit[folder]
    for folder in parents[:-1]:
        match = _REPEAT_FOLDER.match(PurePosixPath(folder).name)
        if match:
            count = int(match.group(1))
            if count < 1:
                raise ValueError(f"repeat folder {folder!r} asks for {count} repeats; rename it (N_name with N >= 1) "
                                 f"or set repeats={{{folder!r}: N}}")
            return count
    return default_repeats


def _image_size(path: Path, rel: str) -> tuple[int, int]:
    """Displayed (width, height) from the header only: no pixel data is decoded."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            # getexif() on a PNG without an eXIf chunk in its header would decode the whole image.
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in im.info else 1
    except OSError as e:
        raise ValueError(f"cannot read image {rel} in {path.parent}: {e}; replace or remove the file") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return width, height


def scan_dataset(
    root: str,
    caption_ext: str = ".txt",
    metadata: str = "auto",
    repeats: dict[str, int] | None = None,
    default_repeats: int = 1,
) -> list[Item]:
    """Find the training images below a folder, with their captions and repeat counts.

    Images are files ending in ``.png``, ``.jpg``, ``.jpeg``, ``.webp`` or ``.bmp`` (any case), searched recursively;
    hidden files and folders (names starting with ``.``, e.g. a latent cache) are skipped. Only the image headers
    are read.

    Repeats: a folder named ``N_name`` (kohya's convention, e.g. ``10_mascot``) anywhere in an image's path gives
    it ``N`` repeats (the innermost such folder wins); an entry of ``repeats`` overrides that for every image below
    its folder (the deepest entry wins); all other images get ``default_repeats``.

    Args:
        root (`str`): the dataset folder.
        caption_ext (`str`, defaults to `".txt"`): extension of the sidecar caption files: ``a.png`` is captioned by
            ``a.txt`` in the same folder.
        metadata (`str`, defaults to `"auto"`): where captions come from. ``"auto"``: ``root/metadata.jsonl`` if it
            exists (sidecars are then ignored), else sidecars. ``"jsonl"``: ``root/metadata.jsonl``, one line
            ``{"file_name": ..., "text": ...}`` per image with ``file_name`` relative to ``root``. ``"sidecar"``:
            sidecar files only.
        repeats (`dict[str, int]`, *optional*): repeat counts by folder, relative to ``root``, e.g.
            ``{"characters/mascot": 5}``; ``"."`` is the root.
        default_repeats (`int`, defaults to 1): repeats of images outside any repeat folder or ``repeats`` entry.

    Returns:
        `list[Item]`: one item per image, sorted by path relative to ``root``; ``bucket`` is not set yet.

    Raises:
        `FileNotFoundError`: when ``root`` is not a folder, or ``metadata="jsonl"`` and there is no metadata.jsonl.
        `ValueError`: when no image is found, an image has no caption, a caption or metadata file is not UTF-8, a
            metadata.jsonl line is malformed, an image cannot be read, or an argument is invalid.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder; pass the folder that holds "
                                "the images and their captions")
    if metadata not in ("auto", "jsonl", "sidecar"):
        raise ValueError(f"metadata must be 'auto', 'jsonl' or 'sidecar', got {metadata!r}")
    if not isinstance(caption_ext, str) or not caption_ext.startswith(".") or len(caption_ext) < 2:
        raise ValueError(f"caption_ext must be a file extension starting with '.', e.g. '.txt'; got {caption_ext!r}")
    if caption_ext.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"caption_ext {caption_ext!r} is an image extension; captions are text files, e.g. '.txt'")
    _check_repeat_count(default_repeats, "default_repeats")
    base = base.resolve()

    images = _find_images(base)
    if not images:
        raise ValueError(f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                         "any case); check the path")

    use_jsonl = metadata == "jsonl" or (metadata == "auto" and (base / METADATA_FILE).is_file())
    if use_jsonl:
        captions, missing = _jsonl_captions(base, images)
    else:
        captions, missing = _sidecar_captions(base, images, caption_ext)
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) >
                                                     _MAX_LISTED else "")
        if use_jsonl:
            hint = f"add a line {_JSONL_EXAMPLE} for each to {base / METADATA_FILE}"
        else:
            hint = (f"write a NAME{caption_ext} file next to each image, pass caption_ext if the captions use "
                    f"another extension, or list the captions in {base / METADATA_FILE}")
        source = METADATA_FILE if use_jsonl else f"{caption_ext} file"
        raise ValueError(f"{len(missing)} of {len(images)} images in {root} have no caption ({source}): {listed}; "
                         f"{hint}")

    explicit: dict[str, int] = {}
    folders = _folders(images)
    for key, value in (repeats or {}).items():
        folder = _normalize_rel(str(key))
        if folder != "." and folder not in folders:
            shown = ", ".join(folders[:20]) + (f" and {len(folders) - 20} more" if len(folders) > 20 else "")
            raise ValueError(f"repeats key {key!r} matches no folder with images in {root}; folders: "
                             f"{shown or '(none: every image is directly in the root)'}")
        explicit[folder] = _check_repeat_count(value, f"repeats[{key!r}]")

    items = []
    for rel in images:
        path = base / rel
        width, height = _image_size(path, rel)
        items.append(Item(path=str(path), caption=captions[rel], repeats=_repeats_of(rel, explicit, default_repeats),
                          width=width, height=height))
    return items


# ---------------------------------------------------------------------------------------------------- buckets


def _candidate_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """For each width the tallest height that keeps the area, and its transpose (kohya's BucketManager)."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width * step <= area:
        height = area // width // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_buckets(
    items: list[Item], resolution: int, step: int = 64, enabled: bool = True, max_aspect: float = 2.0
) -> list[tuple[int, int]]:
    """Give every item the training resolution (bucket) whose aspect ratio is nearest its own.

    Candidate buckets are ``(w, h)`` with both sides multiples of ``step``, ``w * h <= resolution**2`` and an
    aspect ratio within ``[1 / max_aspect, max_aspect]``; for each width only the tallest such height (and the
    transposed pair) is a candidate, so every bucket keeps close to ``resolution**2`` pixels. Distance is
    ``|log(w / h) - log(width / height)|``; ties go to the larger bucket. ``(resolution, resolution)`` is always a
    candidate.

    Args:
        items (`list[Item]`): the dataset; each item's ``bucket`` is set in place.
        resolution (`int`): the square training resolution in pixels, a multiple of ``step``.
        step (`int`, defaults to 64): bucket sides are multiples of this (64 pixels = 8 latent pixels for SD).
        enabled (`bool`, defaults to `True`): `False` gives every item ``(resolution, resolution)``.
        max_aspect (`float`, defaults to 2.0): the widest (and, inverted, tallest) bucket aspect ratio, >= 1.

    Returns:
        `list[tuple[int, int]]`: the ``(width, height)`` buckets in use, sorted.

    Raises:
        `ValueError`: for a resolution that is not a positive multiple of ``step``, a bad ``step`` or ``max_aspect``,
            or an item without a positive size.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"bucket step must be an integer >= 1, got {step!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < step or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of the bucket step {step}, got {resolution!r}")
    if not max_aspect >= 1.0 or not math.isfinite(max_aspect):
        raise ValueError(f"max_aspect must be a finite number >= 1, got {max_aspect!r}")
    for item in items:
        if item.width < 1 or item.height < 1:
            raise ValueError(f"image {item.path} has size {item.width}x{item.height}; it must be at least 1x1")

    if not enabled:
        for item in items:
            item.bucket = (resolution, resolution)
        return [(resolution, resolution)] if items else []

    candidates = _candidate_buckets(resolution, step, max_aspect)
    log_ratios = [math.log(w / h) for w, h in candidates]
    for item in items:
        target = math.log(item.width / item.height)
        best = min(range(len(candidates)),
                   key=lambda i: (abs(log_ratios[i] - target), -candidates[i][0] * candidates[i][1], candidates[i]))
        item.bucket = candidates[best]
    return sorted({item.bucket for item in items})


# ---------------------------------------------------------------------------------------------------- images


def _load_uint8(item: Item) -> torch.Tensor:
    """The item's image at its bucket size, unflipped: a (3, h, w) uint8 tensor."""
    bucket_w, bucket_h = item.bucket
    if bucket_w < 1 or bucket_h < 1:
        raise ValueError(f"image {item.path} has no bucket; call assign_buckets(items, resolution) first")
    try:
        with Image.open(item.path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image.alpha_composite(rgba)
            image = image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {item.path} no longer exists; scan the dataset again") from None
    except OSError as e:
        raise ValueError(f"cannot decode image {item.path}: {e}; replace or remove the file") from None

    # Resize so the image covers the bucket, keeping its aspect ratio, then crop the centre.
    width, height = image.size
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (h, w, 3)
    return pixels.permute(2, 0, 1).contiguous()  # (3, h, w)


def _to_float(pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, h, w) float32 in [-1, 1], optionally mirrored left-right."""
    if flip:
        pixels = torch.flip(pixels, dims=(2,))
    return pixels.float() / 127.5 - 1.0


def load_image(item: Item, flip: bool = False) -> torch.Tensor:
    """Load an item's image at its bucket resolution.

    The image is converted to RGB (transparent pixels are composited on white, EXIF rotation applied), resized with
    Lanczos so that it covers the bucket with its aspect ratio kept, and centre-cropped to exactly the bucket.

    Args:
        item (`Item`): the image; its ``bucket`` must be set (see :func:`assign_buckets`).
        flip (`bool`, defaults to `False`): mirror the image left-right (after cropping).

    Returns:
        `torch.Tensor`: float32 of shape ``(3, bucket height, bucket width)`` with values in ``[-1, 1]``.

    Raises:
        `ValueError`: when the item has no bucket or the image cannot be decoded.
        `FileNotFoundError`: when the image file is gone.
    """
    return _to_float(_load_uint8(item), flip)  # (3, h, w)


# ---------------------------------------------------------------------------------------------------- batches


def epoch_batches(items: list[Item], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, as lists of item indices; every batch holds one bucket only.

    Each item index ``i`` appears ``items[i].repeats`` times. Within each bucket the indices are shuffled and cut
    into batches of exactly ``batch_size``; a bucket's last, incomplete batch is filled by wrapping around to the
    start of that bucket's shuffled list (so a bucket smaller than ``batch_size`` repeats its items). Then the order
    of all batches is shuffled. Randomness comes only from a generator seeded with ``(seed, epoch)``: the same
    arguments always give the same batches, whatever the global RNG state.

    Args:
        items (`list[Item]`): the dataset, with buckets assigned.
        batch_size (`int`): images per batch, >= 1.
        seed (`int`): the run's seed.
        epoch (`int`): the epoch number; each epoch has its own order.

    Returns:
        `list[list[int]]`: the batches, each a list of ``batch_size`` indices into ``items``.

    Raises:
        `ValueError`: for a ``batch_size`` below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(tuple(item.bucket), []).extend([index] * item.repeats)

    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        order = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[k] for k in order]
        num_batches = -(-len(shuffled) // batch_size)
        flat = [shuffled[k % len(shuffled)] for k in range(num_batches * batch_size)]
        batches.extend(flat[k : k + batch_size] for k in range(0, len(flat), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[k] for k in order]
