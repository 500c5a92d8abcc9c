"""Loss and benchmark curves as PNG files, drawn with matplotlib's object API (Agg, no pyplot global state)."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from conditioner.fileio import atomic_path

_DPI = 100


def loss_plot(steps: list[int], losses: list[float], path: str, title: str = "training loss",
              smoothing: float = 0.9, width: int = 720, height: int = 360) -> None:
    """Write a loss curve: raw values in light grey, an exponential moving average in blue, log-scaled y axis.

    Args:
        steps (`list[int]`): x values.
        losses (`list[float]`): y values; values that are not finite and > 0 are skipped.
        path (`str`): output PNG, written atomically.
        title (`str`, defaults to `"training loss"`): heading.
        smoothing (`float`, defaults to 0.9): EMA factor of the smoothed line (in log space).
        width (`int`, defaults to 720): image width in pixels.
        height (`int`, defaults to 360): image height in pixels.
    """
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.subplots()
    ax.set_title(title, loc="left", fontsize=10)
    points = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v) and v > 0]
    if len(points) < 2:
        ax.text(0.5, 0.5, "not enough points yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        smooth, acc = [], math.log(ys[0])
        for y in ys:  # EMA of log(loss): the geometric mean suits a log axis
            acc = smoothing * acc + (1 - smoothing) * math.log(y)
            smooth.append(math.exp(acc))
        ax.plot(xs, ys, color="0.8", linewidth=1, label="loss")
        ax.plot(xs, smooth, color="tab:blue", linewidth=2, label=f"EMA ({smoothing:g})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(True, which="both", color="0.92")
        ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def curves_plot(series: dict[str, tuple[list[float], list[float]]], path: str, title: str = "",
                xlabel: str = "step", ylabel: str = "", y_range: tuple[float, float] | None = None,
                width: int = 720, height: int = 400) -> None:
    """Write several labelled curves on shared linear axes, with a legend, to a PNG.

    Args:
        series (`dict[str, tuple[list[float], list[float]]]`): legend label → (x values, y values); `None` or
            non-finite y values are skipped.
        path (`str`): output PNG, written atomically.
        title (`str`, defaults to `""`): heading.
        xlabel (`str`, defaults to `"step"`): x axis label.
        ylabel (`str`, defaults to `""`): y axis label.
        y_range (`tuple[float, float]`, *optional*): fixed y axis; defaults to the data's range.
        width (`int`, defaults to 720): image width in pixels.
        height (`int`, defaults to 400): image height in pixels.
    """
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.subplots()
    ax.set_title(title, loc="left", fontsize=10)
    xs_all = set()
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        xs_all.update(x for x, _ in points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, linewidth=2, label=label)
    if not xs_all:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        if len(xs_all) <= 8:
            ax.set_xticks(sorted(xs_all))
        if y_range is not None:
            ax.set_ylim(*y_range)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, color="0.92")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _save(fig, path)


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
