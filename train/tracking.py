"""What a run reports while it trains: ``metrics.jsonl``, the progress bar, accelerate trackers, the loss plot.

Only the main process writes; every method is a no-op elsewhere, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import os

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from conditioner.errors import CondvecError
from conditioner.fileio import atomic_path, clear_leftovers
from train.config import flatten, to_yaml
from train.plot import loss_plot

_PACKAGES = {"tensorboard": ("tensorboard", is_tensorboard_available),
             "wandb": ("wandb", is_wandb_available)}
TRACKED = ("loss", "lr", "grad_norm", "tags_in_batch")


def shown(names: list[str], limit: int = 12) -> str:
    """Names for a log line: the first ``limit``, then how many more."""
    return ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def trackers(report_to: str) -> list[str]:
    """The accelerate trackers ``output.report_to`` asks for, checking that their packages are installed.

    Args:
        report_to (`str`): ``none``, ``tensorboard``, ``wandb`` or ``all`` (both).

    Raises:
        CondvecError: a tracker's package is missing; the message says what to install.
    """
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    for name in names:
        package, available = _PACKAGES[name]
        if not available():
            raise CondvecError(f"output.report_to={report_to} needs the {package} package: pip install {package} "
                               "(or set output.report_to=none)")
    return names


def flat_config(cfg) -> dict:
    """The resolved config as ``{"section.key": value}`` with plain values (lists and None as strings)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()}


class RunLog:
    """The run's reports: ``config.yaml``, one JSON line per step, a tqdm bar, accelerate trackers, ``loss.png``.

    Args:
        cfg (`DictConfig`): the run config.
        accelerator (`Accelerator`): the run's accelerator (its ``log_with`` decides the trackers).
        metrics (`list[dict]`): metrics of the steps already taken (a resumed run); rewritten to ``metrics.jsonl``.
        step (`int`): the step the run starts at.
    """

    def __init__(self, cfg, accelerator: Accelerator, metrics: list[dict], step: int):
        self.cfg, self.acc, self.out = cfg, accelerator, cfg.output.dir
        self.main = accelerator.is_main_process
        self.metrics = metrics
        self.path = os.path.join(self.out, "metrics.jsonl")
        self.window: list[float] = []
        if self.main:  # a killed run may have left temporary files behind: they go before anything is written
            for folder in (self.out, os.path.join(self.out, "samples")):
                clear_leftovers(folder)
            with atomic_path(os.path.join(self.out, "config.yaml")) as tmp, open(tmp, "w") as f:
                f.write(to_yaml(cfg))
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in metrics)
        if accelerator.log_with:
            accelerator.init_trackers(os.path.basename(os.path.normpath(self.out)), config=flat_config(cfg))
        self.bar = tqdm(total=cfg.training.steps, initial=step, desc="condvec-train", unit="step",
                        disable=not (cfg.output.progress and self.main), dynamic_ncols=True)

    def step(self, m: dict) -> None:
        """Record one step's metrics (``loss`` is `None` for a skipped step)."""
        self.metrics.append(m)
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")
        if self.acc.log_with and m["loss"] is not None:
            self.acc.log({key: m[key] for key in TRACKED}, step=m["step"])
        if m["loss"] is not None:
            self.window.append(m["loss"])
        self.bar.update(1)
        if (m["step"] % self.cfg.output.log_every == 0 or m["step"] == self.cfg.training.steps) and self.window:
            self.bar.set_postfix(loss=f"{sum(self.window) / len(self.window):.4f}", tags=m["tags_in_batch"])
            self.window = []

    def plot(self) -> str | None:
        """Draw ``loss.png`` from every good step so far; returns its path (main process)."""
        good = [m for m in self.metrics if m["loss"] is not None and math.isfinite(m["loss"])]
        if not self.main or not good:
            return None
        path = os.path.join(self.out, "loss.png")
        loss_plot([m["step"] for m in good], [m["loss"] for m in good], path,
                  title=f"{os.path.basename(self.out)}: training loss (log scale)")
        return path

    def close(self) -> None:
        """Close the bar and the trackers."""
        self.bar.close()
        if self.acc.log_with:
            self.acc.end_training()
