"""Finding a dataset's images and reading their captions, without opening a single image.

The one place that knows a dataset's layout (sidecar ``NAME.txt`` captions searched recursively, kohya repeat
folders, or a ``metadata.jsonl``) and what makes a caption usable. ``train.data.scan_dataset`` builds on it (and
checks every image's header too); ``condvec-bootstrap --data`` uses :func:`scan_captions` to collect a dataset's
tags without importing the trainer or decoding images.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from conditioner.errors import CondvecError
from conditioner.parse import parse_prompt

logger = logging.getLogger("train.data")  # the dataset's warnings keep the logger users filter on

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_JSONL_EXAMPLE = '{"file_name": "a.png", "text": "tag1, tag2"}'
#: Largest caption file read, in bytes.
MAX_CAPTION_BYTES = 1 << 20
#: Longest tag accepted, in characters; a longer "tag" is almost always a sentence caption without commas.
MAX_TAG_CHARS = 1000
#: Most tags accepted in one caption: every tag is one token of the cross-attention sequence.
MAX_TAGS = 1000
# Skip categories, in the order the end-of-scan count lists them.
UNREADABLE, TOO_LARGE, NO_CAPTION, BAD_CAPTION = "unreadable", "too large", "without caption", "with a bad caption"
SKIP_CATEGORIES = (UNREADABLE, TOO_LARGE, NO_CAPTION, BAD_CAPTION)


def _walk_images(root: Path) -> list[str]:
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
                full = os.path.join(folder, name)
                if os.path.exists(full) and not os.path.isfile(full):  # a FIFO, socket or device would block
                    logger.warning("skipping %s: not a regular file", (rel_folder / name).as_posix())
                    continue
                found.append((rel_folder / name).as_posix())
    return sorted(found)


class BadImage(Exception):
    """An image that cannot be used: ``category`` (one of :data:`SKIP_CATEGORIES`) and a one-line ``reason``.

    Raised by the checks of a scan (captions here, an image's header in ``train.data``); the scan skips the image
    or turns it into a :class:`CondvecError`, never lets it out."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category, self.reason = category, reason


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CondvecError(
            f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8"
        ) from e
    except OSError as e:
        raise CondvecError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _sidecar_caption(path: Path) -> str:
    """The text of a sidecar caption file; raises :class:`BadImage` when it is missing or unreadable."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size is None or not path.is_file():
        raise BadImage(NO_CAPTION, f"no caption file {path.name}")
    if size > MAX_CAPTION_BYTES:
        raise BadImage(BAD_CAPTION, f"caption file {path.name} is {size} bytes, over the limit of "
                                      f"{MAX_CAPTION_BYTES}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadImage(BAD_CAPTION, f"caption file {path.name} is not UTF-8 text (bad byte at offset {e.start}); "
                                      "re-save it as UTF-8") from e
    except OSError as e:
        raise BadImage(BAD_CAPTION, f"cannot read caption file {path.name}: {e.strerror or e}") from e


def _check_caption(caption: str) -> None:
    """Raise :class:`BadImage` for a caption that would train nothing or cannot be parsed."""
    if not caption:
        raise BadImage(BAD_CAPTION, "empty caption")
    try:
        tags = parse_prompt(caption)
    except CondvecError as e:
        raise BadImage(BAD_CAPTION, f"caption does not parse: {first_line(e)}") from e
    if not tags:
        raise BadImage(BAD_CAPTION, "caption has no tags (only commas and spaces)")
    if len(tags) > MAX_TAGS:
        raise BadImage(BAD_CAPTION, f"caption has {len(tags)} tags, over the limit of {MAX_TAGS}")
    longest = max(tags, key=lambda tag: len(tag.name))
    if len(longest.name) > MAX_TAG_CHARS:
        raise BadImage(BAD_CAPTION, f"caption has a tag of {len(longest.name)} characters ({longest.name[:30]!r}…), "
                                      f"over the limit of {MAX_TAG_CHARS}; separate tags with commas")


def normalize_rel(path: str) -> str:
    """A dataset-relative path as the scan writes it: ``./a\\b/`` -> ``a/b``; the root itself is ``"."``."""
    return PurePosixPath(path.strip().replace("\\", "/")).as_posix().strip("/") or "."


def _jsonl_captions(root: Path, images: list[str]) -> dict[str, str]:
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
            raise CondvecError(f"{where}: not valid JSON ({e.msg}); each line must be like {_JSONL_EXAMPLE}") from e
        if not isinstance(record, dict):
            raise CondvecError(f"{where}: expected a JSON object like {_JSONL_EXAMPLE}, got {type(record).__name__}")
        for key in ("file_name", "text"):
            if key not in record:
                raise CondvecError(f"{where}: missing key {key!r}; each line must be like {_JSONL_EXAMPLE}")
            if not isinstance(record[key], str):
                raise CondvecError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        rel = normalize_rel(record["file_name"])
        if rel in first_line:
            raise CondvecError(f"{where}: file_name {record['file_name']!r} is already listed on line "
                               f"{first_line[rel]}")
        if rel not in known:
            if not (root / rel).is_file():
                raise CondvecError(f"{where}: file_name {record['file_name']!r} does not exist in "
                                   f"{root}")
            raise CondvecError(f"{where}: file_name {record['file_name']!r} is not an image with one of the "
                               f"extensions {', '.join(IMAGE_EXTENSIONS)}")
        first_line[rel] = lineno
        captions[rel] = record["text"].strip()
    return captions


#: What a scan does with an image it cannot use.
ON_BAD_IMAGE = ("skip", "error")
#: Skipped images named one warning line each, at most; the rest are counted.
MAX_SKIP_LINES = 20


def skip_counts(counts: Counter) -> str:
    """``"2 unreadable, 1 without caption"``."""
    return ", ".join(f"{counts[c]} {c}" for c in SKIP_CATEGORIES if counts[c])


def find_images(root: str | os.PathLike) -> tuple[Path, list[str]]:
    """The dataset folder (resolved) and the relative POSIX paths of its images, sorted.

    Images are files ending in one of :data:`IMAGE_EXTENSIONS` (any case), searched recursively (symlinks followed,
    loops visited once); hidden files and folders (a latent cache, ``.git``) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        CondvecError: it holds no image.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder; pass the folder that holds "
                                "the images and their captions")
    base = base.resolve()
    images = _walk_images(base)
    if not images:
        raise CondvecError(f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                           "any case); check the path")
    return base, images


def read_captions(base: Path, images: list[str], caption_ext: str = ".txt", metadata: str = "auto",
                  on_bad_image: str = "skip", default_caption: str | None = None,
                  check: Callable[[Path], object] | None = None, root: str | os.PathLike | None = None
                  ) -> list[tuple[str, str, object]]:
    """Each usable image's ``(relative path, caption, check(path))``, in file order.

    A caption comes from ``metadata.jsonl`` (``metadata="jsonl"``, or ``"auto"`` when the file exists) or from the
    sidecar ``NAME{caption_ext}``; an image without one takes ``default_caption`` (kohya's class tokens) if given.
    A caption is usable when it parses into 1 … :data:`MAX_TAGS` tags of at most :data:`MAX_TAG_CHARS` characters;
    ``check`` (optional) may refuse an image by raising :class:`BadImage`.

    Bad images are skipped (``on_bad_image="skip"``: after the scan, one warning line each on the ``train.data``
    logger, at most :data:`MAX_SKIP_LINES`, and a count) or raise (``"error"``: the first one, in one line).

    Raises:
        CondvecError: a bad argument, a malformed ``metadata.jsonl``, a bad image with ``on_bad_image="error"``, or
            no usable image left (one line: the counts and the first bad image).
    """
    root = base if root is None else root
    if metadata not in ("auto", "jsonl", "sidecar"):
        raise CondvecError(f"metadata must be 'auto', 'jsonl' or 'sidecar', got {metadata!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise CondvecError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    if not isinstance(caption_ext, str) or not caption_ext.startswith(".") or len(caption_ext) < 2:
        raise CondvecError(f"caption_ext must be a file extension starting with '.', e.g. '.txt'; got {caption_ext!r}")
    if caption_ext.lower() in IMAGE_EXTENSIONS:
        raise CondvecError(f"caption_ext {caption_ext!r} is an image extension; captions are text files, e.g. '.txt'")
    use_jsonl = metadata == "jsonl" or (metadata == "auto" and (base / METADATA_FILE).is_file())
    jsonl = _jsonl_captions(base, images) if use_jsonl else {}
    if use_jsonl:
        caption_hint = f"add a line {_JSONL_EXAMPLE} for it to {base / METADATA_FILE}"
    else:
        caption_hint = (f"write a NAME{caption_ext} file next to each image, pass caption_ext if the captions use "
                        f"another extension, or list the captions in {base / METADATA_FILE}")
    usable, skipped, lines = [], Counter(), []
    for rel in images:
        path = base / rel
        try:
            if use_jsonl:
                if rel not in jsonl:
                    raise BadImage(NO_CAPTION, f"not listed in {METADATA_FILE}")
                caption = jsonl[rel]
            else:
                try:
                    caption = _sidecar_caption(path.with_suffix(caption_ext)).strip()
                except BadImage as bad:
                    if bad.category != NO_CAPTION or not default_caption:
                        raise
                    caption = default_caption
            _check_caption(caption)
            checked = check(path) if check is not None else None
        except BadImage as bad:
            if on_bad_image == "error":
                hint = caption_hint if bad.category == NO_CAPTION else "fix or remove the file"
                raise CondvecError(f"image {rel} in {base}: {bad.reason}; {hint}, or set on_bad_image='skip' "
                                   "(data.on_bad_image) to skip bad images") from bad
            skipped[bad.category] += 1
            lines.append(f"skipping image {rel}: {bad.reason}")
            continue
        usable.append((rel, caption, checked))
    if not usable:
        hint = caption_hint if set(skipped) == {NO_CAPTION} else "fix or remove the bad files"
        raise CondvecError(f"no usable images in {root}: all {len(images)} skipped ({skip_counts(skipped)}; first "
                           f"{lines[0].removeprefix('skipping image ')}); {hint}")
    for line in lines[:MAX_SKIP_LINES]:
        logger.warning("%s", line)
    if len(lines) > MAX_SKIP_LINES:
        logger.warning("… and %d more skipped images", len(lines) - MAX_SKIP_LINES)
    if skipped:
        logger.warning("skipped %d of %d images in %s: %s", sum(skipped.values()), len(images), base,
                       skip_counts(skipped))
    return usable


def scan_captions(root: str | os.PathLike, caption_ext: str = ".txt", metadata: str = "auto") -> list[str]:
    """The usable captions of a dataset, in file order; images are never opened (:func:`read_captions`)."""
    base, images = find_images(root)
    return [caption for _, caption, _ in read_captions(base, images, caption_ext, metadata, root=root)]
