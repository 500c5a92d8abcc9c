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
_UNREADABLE, _TOO_LARGE, _NO_CAPTION, _BAD_CAPTION = "unreadable", "too large", "without caption", "with a bad caption"
_CATEGORIES = (_UNREADABLE, _TOO_LARGE, _NO_CAPTION, _BAD_CAPTION)


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
                full = os.path.join(folder, name)
                if os.path.exists(full) and not os.path.isfile(full):  # a FIFO, socket or device would block
                    logger.warning("skipping %s: not a regular file", (rel_folder / name).as_posix())
                    continue
                found.append((rel_folder / name).as_posix())
    return sorted(found)


class _BadImage(Exception):
    """An image that cannot be used: ``category`` (one of ``_CATEGORIES``) and a one-line ``reason``."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category, self.reason = category, reason


def _first_line(err: BaseException) -> str:
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
    """The text of a sidecar caption file; raises :class:`_BadImage` when it is missing or unreadable."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size is None or not path.is_file():
        raise _BadImage(_NO_CAPTION, f"no caption file {path.name}")
    if size > MAX_CAPTION_BYTES:
        raise _BadImage(_BAD_CAPTION, f"caption file {path.name} is {size} bytes, over the limit of "
                                      f"{MAX_CAPTION_BYTES}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _BadImage(_BAD_CAPTION, f"caption file {path.name} is not UTF-8 text (bad byte at offset {e.start}); "
                                      "re-save it as UTF-8") from e
    except OSError as e:
        raise _BadImage(_BAD_CAPTION, f"cannot read caption file {path.name}: {e.strerror or e}") from e


def _check_caption(caption: str) -> None:
    """Raise :class:`_BadImage` for a caption that would train nothing or cannot be parsed."""
    if not caption:
        raise _BadImage(_BAD_CAPTION, "empty caption")
    try:
        tags = parse_prompt(caption)
    except CondvecError as e:
        raise _BadImage(_BAD_CAPTION, f"caption does not parse: {_first_line(e)}") from e
    if not tags:
        raise _BadImage(_BAD_CAPTION, "caption has no tags (only commas and spaces)")
    if len(tags) > MAX_TAGS:
        raise _BadImage(_BAD_CAPTION, f"caption has {len(tags)} tags, over the limit of {MAX_TAGS}")
    longest = max(tags, key=lambda tag: len(tag.name))
    if len(longest.name) > MAX_TAG_CHARS:
        raise _BadImage(_BAD_CAPTION, f"caption has a tag of {len(longest.name)} characters ({longest.name[:30]!r}…), "
                                      f"over the limit of {MAX_TAG_CHARS}; separate tags with commas")


def _normalize_rel(path: str) -> str:
    """``./a\\b/`` -> ``a/b``; the root itself is ``"."``."""
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
        rel = _normalize_rel(record["file_name"])
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


def scan_captions(root: str | os.PathLike, caption_ext: str = ".txt", metadata: str = "auto") -> list[str]:
    """The usable captions of a dataset, in file order; images are never opened.

    Images whose caption is missing or unusable are skipped, with one warning line and a count.

    Raises:
        CondvecError: the folder holds no image, or no usable caption.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    images = _find_images(base.resolve())
    if not images:
        raise CondvecError(f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    use_jsonl = metadata == "jsonl" or (metadata == "auto" and (base / METADATA_FILE).is_file())
    jsonl = _jsonl_captions(base.resolve(), images) if use_jsonl else {}
    captions, skipped = [], Counter()
    for rel in images:
        try:
            if use_jsonl:
                if rel not in jsonl:
                    raise _BadImage(_NO_CAPTION, f"not listed in {METADATA_FILE}")
                caption = jsonl[rel]
            else:
                caption = _sidecar_caption((base / rel).with_suffix(caption_ext)).strip()
            _check_caption(caption)
        except _BadImage as bad:
            logger.warning("skipping image %s: %s", rel, bad.reason)
            skipped[bad.category] += 1
            continue
        captions.append(caption)
    if skipped:
        logger.warning("skipped %d of %d images in %s: %s", sum(skipped.values()), len(images), root,
                       ", ".join(f"{n} {c}" for c, n in skipped.items()))
    if not captions:
        raise CondvecError(f"no image in {root} has a usable caption")
    return captions
