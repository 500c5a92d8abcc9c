"""Concept-quality benchmark on the embedded tiny base: fidelity per table mode, bleeding, key/value swap.

One command (not run in CI; about 25 minutes on 2 CPU cores)::

    python -m benchmarks.quality --out benchmarks/results

What it measures (every number comes from :mod:`demo.detector` reading generated images):

1. detector accuracy on the generator's own ground truth (must be >= 98% before anything else means anything);
2. concept fidelity: the frozen base learns two new concepts (``mascot`` = large magenta circle on the left,
   ``badge`` = small cyan square on the right) into a fresh table of each mode — ``single``, ``blocks``,
   ``layers``, key/value, ``layers`` with 2 timestep anchors — same steps, batch and learning rate, several seeds;
   fidelity = fraction of samples with exactly one object, the right background and every attribute (shape,
   colour, size, position) right; measured at several step counts (convergence curve);
3. bleeding: both concepts learned into the base's own table and prompted together; both must appear with their
   own attributes, and an object showing an attribute of the other concept counts as bleeding;
4. swap: ``key = mascot, value = badge`` (and the reverse) in all layers and in the down / up halves; which
   attributes follow the key concept and which the value concept.

Writes ``results.json``, labelled PNG grids and ``convergence.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from demo.detector import ATTRIBUTES, check_one, detect, match_two, validate
from train.config import load_config
from train.loop import Trainer
from train.model import diffusers_config
from train.plot import curves_plot
from unet_patch.grid import labelled_grid

BASE = "models/tiny-base"
CONCEPTS = {
    "mascot": {"shape": "circle", "colour": "magenta", "size": "large", "position": "left"},
    "badge": {"shape": "square", "colour": "cyan", "size": "small", "position": "right"},
}
LAYOUTS = {
    "single": ["table.groups=single"],
    "blocks": ["table.groups=blocks"],
    "layers": ["table.groups=layers"],
    "kv": ["table.mode=kv"],
    "layers+2 anchors": ["table.groups=layers", "table.anchors=2"],
}
BACKGROUND = "white"
# The same two objects described with the base's own tags, for comparison with the learned concepts.
BASE_TAGS_PROMPT = ("magenta circle, large circle, circle on left, cyan square, small square, square on right, "
                    f"two objects, {BACKGROUND} background")
GRID_SCALE = 2


def _data(root: str) -> str:
    from demo.data import generate_concept_dataset

    path = os.path.join(root, "concepts")
    marker = os.path.join(path, "concepts.json")
    if not os.path.exists(marker) or json.loads(Path(marker).read_text()) != CONCEPTS:
        for k, (tag, attrs) in enumerate(CONCEPTS.items()):
            generate_concept_dataset(os.path.join(path, tag), tag, attrs, 64, size=32, seed=100 + k)
        with open(marker, "w") as f:
            json.dump(CONCEPTS, f)
    return path


LR = 2e-2


def _trainer(data: str, out: str, seed: int, steps: int, extra: list[str], lr: float = LR) -> Trainer:
    cfg = load_config(None, [
        f"model.pretrained={BASE}", f"data.path={data}", "data.bucketing=false", "data.caption_dropout=0.0",
        "table.train_special=false", "table.init=normal", "training.train=table", f"training.steps={steps}",
        "training.batch_size=16", f"training.lr={lr}", "training.min_snr_gamma=0", f"training.seed={seed}",
        f"output.dir={out}", "output.progress=false", *extra,
    ])
    return Trainer(cfg)


def _generate(trainer: Trainer, prompt: str, n: int, seed: int = 1000) -> list[Image.Image]:
    from diffusers import DDIMScheduler

    from unet_patch.pipeline import TagDiffusionPipeline

    config = diffusers_config(trainer.noise_scheduler)
    pipe = TagDiffusionPipeline(unet=trainer.unet, scheduler=DDIMScheduler.from_config(config), vae=None,
                                table=trainer.table)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=20, guidance_scale=3.0, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(seed)).images


def _fidelity(trainer: Trainer, n: int) -> dict:
    """For each concept: fraction of ``n`` samples with every attribute right, and per attribute."""
    scores: dict = {}
    for tag, attrs in CONCEPTS.items():
        checks = [check_one(detect(im), attrs, BACKGROUND)
                  for im in _generate(trainer, f"{tag}, {BACKGROUND} background", n)]
        scores[tag] = {key: sum(c[key] for c in checks) / n for key in checks[0]}
    scores["mean"] = sum(scores[t]["all"] for t in CONCEPTS) / len(CONCEPTS)
    return scores


def _label(mode: str) -> str:
    return mode.replace(" ", "_").replace("+", "_")


def run_fidelity(out: str, seeds: list[int], steps: int, eval_at: list[int], n: int,
                 modes: list[str] | None = None, lr: float = LR) -> dict:
    """Train both concepts into a fresh table of every mode (or ``modes``) and seed; fidelity along the way."""
    data = _data(out)
    results: dict = {}
    grid_rows, grid_labels = [], []
    for mode, extra in LAYOUTS.items():
        if modes and mode not in modes:
            continue
        runs = []
        for seed in seeds:
            started = time.time()
            trainer = _trainer(data, os.path.join(out, "runs", f"{_label(mode)}-{seed}"), seed, steps,
                               ["table.use_base_table=false", *extra], lr)
            curve = []
            while trainer.state.step < steps:
                trainer.train_step()
                if trainer.state.step in eval_at or trainer.state.step == steps:
                    curve.append({"step": trainer.state.step, **_fidelity(trainer, n)})
            runs.append({"seed": seed, "curve": curve, "seconds": time.time() - started})
            print(f"{mode:18s} seed {seed}: fidelity {curve[-1]['mean']:.2f} ({time.time() - started:.0f} s)",
                  flush=True)
            if seed == seeds[0]:
                for tag in CONCEPTS:
                    grid_rows.append(_generate(trainer, f"{tag}, {BACKGROUND} background", 8))
                    grid_labels.append(f"{mode}: {tag}")
        results[mode] = runs
    _save_grid(grid_rows, grid_labels, os.path.join(out, "fidelity-modes.png"),
               f"concept fidelity per mode, seed {seeds[0]}, {steps} steps (prompt: TAG, {BACKGROUND} background)")
    series = {}
    for mode, runs in results.items():
        points = sorted({p["step"] for r in runs for p in r["curve"]})
        series[mode] = (points, [sum(p["mean"] for r in runs for p in r["curve"] if p["step"] == s) / len(runs)
                                 for s in points])
    curves_plot(series, os.path.join(out, "convergence.png"),
                f"concept fidelity vs steps (mean of {len(seeds)} seeds)", xlabel="training step",
                ylabel="fidelity", y_range=(0.0, 1.0))
    return results


def _save_grid(rows: list[list[Image.Image]], labels: list[str], path: str, title: str) -> None:
    grid = labelled_grid(rows, labels, [f"#{j}" for j in range(len(rows[0]))], title=title, upscale=GRID_SCALE)
    grid.save(path)


def _two_concepts(images: list[Image.Image]) -> dict:
    """Rates over two-concept samples: two objects, both concepts right, and bleeding.

    Each detected object is matched to the concept it agrees with most (over both assignments); a sample bleeds
    when a matched object shows an attribute value of the *other* concept (all four attributes differ between
    the two concepts).
    """
    mascot, badge = CONCEPTS["mascot"], CONCEPTS["badge"]
    two = both = bleed = 0
    for image in images:
        objs = detect(image)["objects"]
        if len(objs) != 2:
            continue
        two += 1

        def agree(obj, concept):
            return sum(obj[a] == concept[a] for a in ATTRIBUTES)

        pair = match_two(objs, (mascot, badge))
        both += int(agree(pair[0], mascot) == len(ATTRIBUTES) and agree(pair[1], badge) == len(ATTRIBUTES))
        bleed += int(agree(pair[0], badge) > 0 or agree(pair[1], mascot) > 0)
    n = len(images)
    return {"two_objects": two / n, "both_right": both / n, "bleeding": bleed / n}


def run_bleeding_and_swap(out: str, steps: int, n: int, lr: float = LR) -> dict:
    """Both concepts in the base's own table: fidelity, bleeding when prompted together, key/value swaps."""
    from merge import swap

    data = _data(out)
    trainer = _trainer(data, os.path.join(out, "runs", "base-table"), 0, steps, ["table.freeze_existing=true"], lr)
    while trainer.state.step < steps:
        trainer.train_step()
    result: dict = {"fidelity_in_base_table": _fidelity(trainer, n)}

    prompt = f"mascot, badge, two objects, {BACKGROUND} background"
    images = _generate(trainer, prompt, n)
    base_images = _generate(trainer, BASE_TAGS_PROMPT, n)
    result["bleeding"] = {"prompt": prompt, **_two_concepts(images)}
    result["bleeding_base_tags"] = {"prompt": BASE_TAGS_PROMPT, **_two_concepts(base_images)}
    _save_grid([images[:8], base_images[:8]], ["mascot, badge, two objects", "the same with base tags"],
               os.path.join(out, "bleeding.png"), "two concepts in one prompt (white background)")

    table = trainer.table
    swaps, grid_rows, grid_labels = {}, [], []
    for key, value in (("mascot", "badge"), ("badge", "mascot")):
        for layers in (None, "down.*", "up.*"):
            name = f"k-{key}-v-{value}-{layers or 'all'}"
            trainer.table = swap(table, name, key=key, value=value, layers=layers)
            images = _generate(trainer, f"{name}, {BACKGROUND} background", n)
            follow = {a: {"key": 0, "value": 0, "neither": 0} for a in ATTRIBUTES}
            count_ok = 0
            for im in images:
                objs = detect(im)["objects"]
                if len(objs) != 1:
                    continue
                count_ok += 1
                for a in follow:
                    got = objs[0][a]
                    side = "key" if got == CONCEPTS[key][a] else "value" if got == CONCEPTS[value][a] else "neither"
                    follow[a][side] += 1
            swaps[name] = {"key": key, "value": value, "layers": layers or "all", "one_object": count_ok / n,
                           "follows": {a: {s: c / max(1, count_ok) for s, c in v.items()} for a, v in follow.items()}}
            grid_rows.append(images[:8])
            grid_labels.append(f"key {key}, value {value}, {layers or 'all layers'}")
    trainer.table = table
    _save_grid(grid_rows, grid_labels, os.path.join(out, "swap.png"), "key/value swaps (white background)")
    result["swap"] = swaps
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[20, 40],
                        help="extra step counts at which fidelity is measured (it always is at --steps)")
    parser.add_argument("--samples", type=int, default=16, help="generated images per concept and measurement")
    parser.add_argument("--modes", nargs="+", choices=list(LAYOUTS),
                        help="fidelity for these layouts only (default all)")
    parser.add_argument("--lr", type=float, default=LR, help=f"table learning rate of every run (default {LR:g})")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--fidelity-only", action="store_true", help="skip the bleeding and swap measurements")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "concepts": CONCEPTS,
        "lr": args.lr,
        "detector": {size: validate(1000, size) for size in (32,)},
    }
    print("detector:", json.dumps(report["detector"]), flush=True)
    if not args.skip_fidelity:
        report["fidelity"] = run_fidelity(args.out, args.seeds, args.steps, args.eval_at, args.samples,
                                          args.modes, args.lr)
    if not args.fidelity_only:
        report.update(run_bleeding_and_swap(args.out, args.steps, args.samples, args.lr))
    report["seconds"] = time.time() - started
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "fidelity"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
