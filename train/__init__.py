"""YAML-configured training of tag tables (and optionally UNet weights): ``condvec-train``."""

from __future__ import annotations

from conditioner.lazy import lazy_exports

# Exported names and their modules, imported on first use (conditioner.lazy): --help stays fast.
_EXPORTS = {
    "RunConfig": "train.config",
    "load_config": "train.config",
    "Trainer": "train.loop",
    "train": "train.loop",
}

__all__ = ["RunConfig", "Trainer", "load_config", "train"]


lazy_exports(__name__, _EXPORTS)
