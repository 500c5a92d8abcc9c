"""YAML-configured training of tag tables (and optionally UNet weights): ``condvec-train``."""

from train.config import RunConfig, load_config
from train.loop import Trainer, train

__all__ = ["RunConfig", "Trainer", "load_config", "train"]
