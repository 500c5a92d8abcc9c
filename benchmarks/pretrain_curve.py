"""Learning curve of the miniature SD's pretraining: every snapshot scored through its own text encoder.

    python -m benchmarks.pretrain_curve --work runs/mini-sd [--num 8]

``python -m demo.pretrain unet`` exports a snapshot every ``--snapshot-every`` steps, with EMA weights
(``snapshots/step-N``) and without (``snapshots/step-N-raw``). Each is scored by :func:`benchmarks.base_eval.evaluate`
(diffusers' stock ``StableDiffusionPipeline``, detector-read, fixed seeds); results accumulate in
``WORK/curve.json`` (snapshots already scored are skipped) and are drawn to ``WORK/curve.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.base_eval import evaluate

SERIES = (("shape", "one-object shape"), ("all", "one-object: every attribute"),
          ("colours bound", "two-object: both colour-shape pairs"))


def score_snapshots(work: Path, num: int, guidance: float = 3.0, steps: int = 25) -> dict:
    """Score every snapshot not yet in ``work/curve.json``; returns the whole curve."""
    path = work / "curve.json"
    curve = json.loads(path.read_text()) if path.exists() else {}
    for snap in sorted((work / "snapshots").glob("step-*")):
        if snap.name in curve or snap.name.endswith(".tmp") or not (snap / "model_index.json").exists():
            continue
        result = evaluate(str(snap), guidance, steps, num, text_encoder=True)
        curve[snap.name] = result
        path.write_text(json.dumps(curve, indent=1, sort_keys=True))
        two = result["two-object prompts"]
        print(f"{snap.name}: shape {result['shape']:.2f}, all {result['all']:.2f}, "
              f"colours bound {two['colours bound']:.2f}", flush=True)
    return curve


def plot(curve: dict, out: Path) -> Path:
    """Shape, every-attribute and binding accuracy against steps, with and without EMA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SERIES), figsize=(4 * len(SERIES), 3.2), sharey=True)
    for ax, (key, title) in zip(axes, SERIES):
        for suffix, label, style in (("", "EMA 0.999", "-o"), ("-raw", "raw weights", "--s")):
            names = sorted(n for n in curve if n.endswith("-raw") == (suffix == "-raw"))
            steps = [int(n.split("-")[1]) for n in names]
            values = [curve[n][key] if key in curve[n] else curve[n]["two-object prompts"][key] for n in names]
            ax.plot(steps, values, style, label=label, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("fraction right (detector)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_curve", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/mini-sd"))
    parser.add_argument("--num", type=int, default=8, help="samples per prompt (6 one-object, 3 two-object prompts)")
    args = parser.parse_args(argv)
    curve = score_snapshots(args.work, args.num)
    print(f"wrote {plot(curve, args.work / 'curve.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
