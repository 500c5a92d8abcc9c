"""kohya sd-scripts dataset configs (``dataset_config.toml``), read as kohya users write them.

``data.kohya_config: dataset.toml`` replaces ``data.path``: every ``[[datasets.subsets]]`` is scanned like a
``data.path`` folder, with its own repeats, caption extension and ``keep_tokens``. Keys, as sd-scripts documents them:

- ``[general]`` and ``[[datasets]]``: defaults for the subsets below them (``shuffle_caption``, ``keep_tokens``,
  ``caption_extension``, ``class_tokens``); ``resolution`` (an int or ``[width, height]``), ``enable_bucket``,
  ``bucket_reso_steps``, ``min_bucket_reso`` / ``max_bucket_reso`` (the last two have no condvec counterpart);
- ``[[datasets.subsets]]``: ``image_dir``, ``num_repeats``, ``caption_extension``, ``keep_tokens``,
  ``shuffle_caption``, ``class_tokens`` (the caption of images that have no caption file, DreamBooth style),
  ``is_reg``.

``shuffle_caption`` changes nothing here: tag order carries no meaning in condvec (cross-attention has no positions).
``is_reg`` subsets (prior preservation) train only when UNet weights do (``training.train`` full or table+kv);
with a frozen UNet they would teach the table nothing new and are skipped with one line. Keys condvec does not know
are named in one line and ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from conditioner.errors import CondvecError

#: Keys read but without a per-subset condvec counterpart (named once when present): data.flip,
#: data.caption_dropout and data.tag_dropout apply to the whole run, training.batch_size is the run's.
_NO_EFFECT = {"min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "color_aug", "random_crop", "batch_size",
              "caption_separator", "keep_tokens_separator", "caption_prefix", "caption_suffix", "flip_aug",
              "caption_dropout_rate", "caption_tag_dropout_rate"}
_USED = {"shuffle_caption", "keep_tokens", "caption_extension", "class_tokens"}
_GENERAL = _USED | _NO_EFFECT | {"resolution", "enable_bucket", "bucket_reso_steps"}
_SUBSET = _USED | (_NO_EFFECT - {"batch_size"}) | {"image_dir", "num_repeats", "is_reg"}
_INHERITED = tuple(sorted(_USED))


@dataclass
class Subset:
    """One ``[[datasets.subsets]]`` entry, with the defaults of its dataset and of ``[general]`` applied."""

    image_dir: str
    num_repeats: int = 1
    caption_extension: str = ".caption"
    keep_tokens: int = 0
    class_tokens: str | None = None
    is_reg: bool = False


@dataclass
class KohyaDataset:
    """What a kohya dataset config says: its subsets and the resolution / bucket settings it sets."""

    subsets: list[Subset]
    resolution: int | None = None
    enable_bucket: bool | None = None
    bucket_reso_steps: int | None = None
    notes: list[str] | None = None  # one line each, for the run's log


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise CondvecError("reading a kohya dataset config needs Python >= 3.11 (tomllib) or `pip install "
                               "tomli`") from err
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.kohya_config {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise CondvecError(f"data.kohya_config {path!r} is not valid TOML ({str(err).splitlines()[0]})") from err


def _int(value, key: str, where: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CondvecError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    return value


def read_kohya_config(path: str) -> KohyaDataset:
    """Parse a kohya ``dataset_config.toml``.

    Raises:
        CondvecError: not TOML, no subsets, a subset without ``image_dir``, a value of the wrong type.
    """
    config = _load_toml(path)
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        raise CondvecError(f"{path}: a kohya dataset config needs [[datasets]] with [[datasets.subsets]]")
    unknown: set[str] = {f"general.{k}" for k in general if k not in _GENERAL}
    unknown |= {f"{k}" for k in config if k not in ("general", "datasets")}
    used_no_effect: set[str] = set(general) & _NO_EFFECT
    subsets, resolution, enable_bucket, steps = [], general.get("resolution"), general.get("enable_bucket"), \
        general.get("bucket_reso_steps")
    for di, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            raise CondvecError(f"{path}: [[datasets]] entry {di + 1} is not a table")
        unknown |= {f"datasets.{k}" for k in dataset if k not in _GENERAL | {"subsets"}}
        used_no_effect |= set(dataset) & _NO_EFFECT
        resolution = dataset.get("resolution", resolution)
        enable_bucket = dataset.get("enable_bucket", enable_bucket)
        steps = dataset.get("bucket_reso_steps", steps)
        inherited = {k: dataset.get(k, general.get(k)) for k in _INHERITED}
        entries = dataset.get("subsets", [])
        if not isinstance(entries, list) or not entries:
            raise CondvecError(f"{path}: [[datasets]] entry {di + 1} has no [[datasets.subsets]]")
        for si, entry in enumerate(entries):
            where = f"{path}: dataset {di + 1}, subset {si + 1}"
            if not isinstance(entry, dict) or "image_dir" not in entry:
                raise CondvecError(f"{where}: a subset needs image_dir")
            unknown |= {f"datasets.subsets.{k}" for k in entry if k not in _SUBSET}
            used_no_effect |= set(entry) & _NO_EFFECT
            values = {k: v for k, v in inherited.items() if v is not None} | entry
            image_dir = str(values["image_dir"])
            if not os.path.isabs(image_dir):
                image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), image_dir)
            ext = str(values.get("caption_extension", ".caption"))
            subsets.append(Subset(
                image_dir=image_dir, num_repeats=_int(values.get("num_repeats", 1), "num_repeats", where, 1),
                caption_extension=ext if ext.startswith(".") else "." + ext,
                keep_tokens=_int(values.get("keep_tokens", 0), "keep_tokens", where),
                class_tokens=values.get("class_tokens"), is_reg=bool(values.get("is_reg", False))))
    if isinstance(resolution, list):
        if len(resolution) != 2 or resolution[0] != resolution[1]:
            raise CondvecError(f"{path}: resolution {resolution} is not square; condvec trains about resolution² "
                               "pixels per image with aspect buckets: give one number")
        resolution = resolution[0]
    notes = []
    if unknown:
        notes.append(f"kohya config: keys condvec does not know, ignored: {', '.join(sorted(unknown))}")
    if used_no_effect:
        notes.append(f"kohya config: keys without a condvec counterpart, ignored: {', '.join(sorted(used_no_effect))}")
    return KohyaDataset(subsets=subsets, resolution=None if resolution is None else _int(resolution, "resolution",
                                                                                          path, 8),
                        enable_bucket=enable_bucket, bucket_reso_steps=steps, notes=notes)
