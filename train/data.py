"""The training dataset: scanning images and captions, aspect-ratio buckets, image loading and per-epoch batches.

Dataset layouts (see :func:`scan_dataset`)::

    ROOT/a.png, ROOT/a.txt                        sidecar captions, searched recursively
    ROOT/10_mascot/b.png, ROOT/10_mascot/b.txt    kohya repeat folder: its images count 10 times per epoch
    ROOT/metadata.jsonl                           {"file_name": "a.png", "text": "tag1, tag2"} per line

A caption is comma-separated tags, parsed by :func:`conditioner.parse.parse_prompt`.

Bad data never stops a run with a traceback: an image that cannot be used (unreadable, truncated, too large, no
caption, an empty, non-UTF-8 or unparsable caption, a caption of only commas, a tag longer than
:data:`MAX_TAG_CHARS`, more than :data:`MAX_TAGS` tags) is skipped with one warning line naming the file and the
reason, and a count at the end (``on_bad_image="skip"``, the default), or is a one-line ``CondvecError``
(``on_bad_image="error"``). A dataset left without any usable image is always an error. Images are checked at scan
time from their headers (PNG chunk checksums, JPEG decoded at 1/8 scale), so later stages never see a bad file.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from conditioner.captions import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
    ON_BAD_IMAGE,
    TOO_LARGE,
    UNREADABLE,
    BadImage,
    find_images,
    first_line,
    normalize_rel,
    read_captions,
)
from conditioner.errors import CondvecError

logger = logging.getLogger(__name__)

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees: the displayed image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

__all__ = ["IMAGE_EXTENSIONS", "MAX_CAPTION_BYTES", "MAX_TAG_CHARS", "MAX_TAGS", "ON_BAD_IMAGE",
           "MAX_IMAGE_PIXELS", "Item", "scan_dataset", "assign_buckets", "load_image", "micro_conditioning",
           "epoch_batches"]
#: Largest image accepted, in pixels (8192 x 8192); a larger header is refused before any pixel is decoded, so a
#: decompression bomb (a small file claiming a huge size) never allocates its pixels.
MAX_IMAGE_PIXELS = 8192 * 8192

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
    keep: int = 0  # the first `keep` tags of the caption are never dropped (kohya's keep_tokens)


# ---------------------------------------------------------------------------------------------------- scanning


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
        raise CondvecError(f"{what} must be an integer >= 1, got {value!r}")
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
                raise CondvecError(f"repeat folder {folder!r} asks for {count} repeats; rename it "
                                   f"(N_name with N >= 1) or set repeats={{{folder!r}: N}}")
            return count
    return default_repeats


def _image_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """Displayed (width, height) of a usable image; raises :class:`BadImage` otherwise.

    The size is read from the header and checked against ``max_pixels`` before any pixel data is touched. Then the
    file is checked cheaply: a PNG's chunk checksums (``verify``, no decompression), a JPEG decoded at 1/8 scale;
    other formats are decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our own limit
            with Image.open(path) as im:
                width, height = im.size
                if width < 1 or height < 1:
                    raise BadImage(UNREADABLE, f"image header says {width}x{height} pixels")
                if width * height > max_pixels:
                    raise BadImage(TOO_LARGE, f"image is {width}x{height} pixels, over the limit of {max_pixels}; "
                                                "downscale it")
                # getexif() on a PNG without an eXIf chunk in its header would decode the whole image.
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in im.info else 1
            with Image.open(path) as im:
                if im.format == "PNG":
                    im.verify()
                else:
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    im.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(TOO_LARGE, f"image is too large ({first_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error, EOFError... on bad files
        raise BadImage(UNREADABLE, f"unreadable image ({first_line(e)})") from e
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return width, height


def scan_dataset(
    root: str,
    caption_ext: str = ".txt",
    metadata: str = "auto",
    repeats: dict[str, int] | None = None,
    default_repeats: int = 1,
    on_bad_image: str = "skip",
    max_pixels: int = MAX_IMAGE_PIXELS,
    default_caption: str | None = None,
) -> list[Item]:
    """Find the training images below a folder, with their captions and repeat counts.

    Images are files ending in ``.png``, ``.jpg``, ``.jpeg``, ``.webp`` or ``.bmp`` (any case), searched recursively
    (symlinks followed, symlink loops visited once); hidden files and folders (names starting with ``.``, e.g. a
    latent cache) are skipped. Only the image headers are read, and each file is checked cheaply (see the module
    docstring).

    Repeats: a folder named ``N_name`` (kohya's convention, e.g. ``10_mascot``) anywhere in an image's path gives
    it ``N`` repeats (the innermost such folder wins); an entry of ``repeats`` overrides that for every image below
    its folder (the deepest entry wins); all other images get ``default_repeats``.

    Bad images: an unreadable, truncated or too large image, an image without a caption, and a caption that is
    empty, not UTF-8, unparsable, only commas, has a tag over :data:`MAX_TAG_CHARS` characters or more than
    :data:`MAX_TAGS` tags, are skipped — after the scan, one warning line each on the ``train.data`` logger (the
    first :data:`~conditioner.captions.MAX_SKIP_LINES`) and a count (``"skipped 3 of 20 images in DATA: 2
    unreadable, 1 without caption"``); none when no image is usable, which is one error line — or raise, depending
    on ``on_bad_image`` (the scan is :func:`conditioner.captions.read_captions`, shared with the bootstrap CLI).
    Grayscale, alpha, palette and 16-bit images are valid (see :func:`load_image`).

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
        on_bad_image (`str`, defaults to `"skip"`): ``"skip"`` leaves bad images out with a warning each;
            ``"error"`` raises a ``CondvecError`` naming the first bad image and the reason.
        max_pixels (`int`, defaults to :data:`MAX_IMAGE_PIXELS`): largest accepted ``width * height``; larger
            images are bad, refused from their header alone.
        default_caption (`str`, *optional*): the caption of images without a caption file (kohya's
            ``class_tokens``); without it such images are bad.

    Returns:
        `list[Item]`: one item per usable image, sorted by path relative to ``root``; ``bucket`` is not set yet.

    Raises:
        `FileNotFoundError`: when ``root`` is not a folder, or ``metadata="jsonl"`` and there is no metadata.jsonl.
        `CondvecError`: when no image is found, no usable image is left, a bad image is found with
            ``on_bad_image="error"``, the metadata file is not UTF-8 or a line of it is malformed, or an argument is
            invalid.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise CondvecError(f"max_pixels must be an integer >= 1, got {max_pixels!r}")
    _check_repeat_count(default_repeats, "default_repeats")
    base, images = find_images(root)
    explicit: dict[str, int] = {}
    folders = _folders(images)
    for key, value in (repeats or {}).items():
        folder = normalize_rel(str(key))
        if folder != "." and folder not in folders:
            shown = ", ".join(folders[:20]) + (f" and {len(folders) - 20} more" if len(folders) > 20 else "")
            raise CondvecError(f"repeats key {key!r} matches no folder with images in {root}; folders: "
                               f"{shown or '(none: every image is directly in the root)'}")
        explicit[folder] = _check_repeat_count(value, f"repeats[{key!r}]")
    usable = read_captions(base, images, caption_ext, metadata, on_bad_image, default_caption,
                           check=lambda path: _image_size(path, max_pixels), root=root)
    return [Item(path=str(base / rel), caption=caption, repeats=_repeats_of(rel, explicit, default_repeats),
                 width=size[0], height=size[1]) for rel, caption, size in usable]


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
        `CondvecError`: for a resolution that is not a positive multiple of ``step``, a bad ``step`` or ``max_aspect``,
            or an item without a positive size.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CondvecError(f"bucket step must be an integer >= 1, got {step!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < step or resolution % step:
        raise CondvecError(f"resolution must be a positive multiple of the bucket step {step}, got {resolution!r}")
    if not max_aspect >= 1.0 or not math.isfinite(max_aspect):
        raise CondvecError(f"max_aspect must be a finite number >= 1, got {max_aspect!r}")
    for item in items:
        if item.width < 1 or item.height < 1:
            raise CondvecError(f"image {item.path} has size {item.width}x{item.height}; it must be at least 1x1")

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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: transparency composited on white, 16/32-bit gray scaled (not clipped) to 8 bit."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's own convert clips these to 255 instead of scaling; 16-bit PNGs open in these modes.
        gray = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("P", "L", "RGB") and
                                                             "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


def _load_uint8(item: Item) -> torch.Tensor:
    """The item's image at its bucket size, unflipped: a (3, h, w) uint8 tensor."""
    bucket_w, bucket_h = item.bucket
    if bucket_w < 1 or bucket_h < 1:
        raise CondvecError(f"image {item.path} has no bucket; call assign_buckets(items, resolution) first")
    try:
        with Image.open(item.path) as opened:
            image = _to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {item.path} no longer exists; scan the dataset again") from err
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error... on bad files
        raise CondvecError(f"cannot decode image {item.path}: {first_line(e)}; replace or remove the file") from e

    # Resize so the image covers the bucket, keeping its aspect ratio, then crop the centre.
    (new_w, new_h), (left, top) = _cover_and_crop(image.size, item.bucket)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.LANCZOS)
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (h, w, 3)
    return pixels.permute(2, 0, 1).contiguous()  # (3, h, w)


def _cover_and_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The size an image of ``size`` is resized to so it covers ``bucket`` (aspect kept), and the centre crop's
    top-left corner in that resized image: ``((width, height), (left, top))``."""
    (width, height), (bucket_w, bucket_h) = size, bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    return (new_w, new_h), ((new_w - bucket_w) // 2, (new_h - bucket_h) // 2)


def micro_conditioning(item: Item) -> tuple[int, int, int, int, int, int]:
    """SDXL's size and crop conditioning (``add_time_ids``) of one training sample, as SDXL was trained with it.

    ``(original height, original width, crop top, crop left, target height, target width)``: the image's own size,
    where the bucket's centre crop starts in the resized image, and the bucket size (what is generated).
    """
    (_, _), (left, top) = _cover_and_crop((item.width, item.height), item.bucket)
    bucket_w, bucket_h = item.bucket
    return item.height, item.width, top, left, bucket_h, bucket_w


def _to_float(pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, h, w) float32 in [-1, 1], optionally mirrored left-right."""
    if flip:
        pixels = torch.flip(pixels, dims=(2,))
    return pixels.float() / 127.5 - 1.0


def load_image(item: Item, flip: bool = False) -> torch.Tensor:
    """Load an item's image at its bucket resolution.

    The image is converted to 8-bit RGB (grayscale replicated, palettes expanded, 16-bit values scaled to 8 bits,
    transparent pixels composited on white, EXIF rotation applied), resized with
    Lanczos so that it covers the bucket with its aspect ratio kept, and centre-cropped to exactly the bucket.

    Args:
        item (`Item`): the image; its ``bucket`` must be set (see :func:`assign_buckets`).
        flip (`bool`, defaults to `False`): mirror the image left-right (after cropping).

    Returns:
        `torch.Tensor`: float32 of shape ``(3, bucket height, bucket width)`` with values in ``[-1, 1]``.

    Raises:
        `CondvecError`: when the item has no bucket or the image cannot be decoded.
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
        `CondvecError`: for a ``batch_size`` below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CondvecError(f"batch_size must be an integer >= 1, got {batch_size!r}")
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
