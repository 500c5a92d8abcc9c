"""Concept-quality benchmark on the embedded tiny base: fidelity per table mode, bleeding, key/value swap.

One command (not run in CI; about 25 minutes on 2 CPU cores)::

    python -m benchmarks.quality --out benchmarks/results [--seeds 0 1 2] [--steps 90]

What it measures (every number comes from :mod:`benchmarks.detector` reading generated images):

1. detector accuracy on the generator's own ground truth (must be >= 98% before anything else means anything);
2. concept fidelity: the frozen base learns two new concepts (``mascot`` = large magenta circle, ``badge`` = small
   cyan square) with each table mode — ``single``, ``blocks``, ``layers``, key/value, ``layers`` with 2 timestep
   anchors — same steps, same batch, same learning rate, several seeds; fidelity = fraction of samples whose
   detected object count, colour, size and background are all right (shape is reported separately: the tiny base
   draws blobs); measured along the way (convergence);
3. bleeding: both concepts learned into the base's own table, prompted together; both must appear with their own
   attributes;
4. swap: ``key = mascot, value = badge`` (and the reverse) in all layers and in the down / up halves; which
   attributes follow the key concept and which the value concept.

Writes ``results.json`` and PNG grids into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from PIL import Image

from benchmarks.detector import detect, validate
from train.config import load_config
from train.loop import Trainer

BASE = "models/tiny-base"
CONCEPTS = {
    "mascot": {"shape": "circle", "colour": "magenta", "size": "large"},
    "badge": {"shape": "square", "colour": "cyan", "size": "small"},
}
MODES = {
    "single": ["table.groups=single"],
    "blocks": ["table.groups=blocks"],
    "layers": ["table.groups=layers"],
    "kv": ["table.mode=kv"],
    "layers+2 anchors": ["table.groups=layers", "table.anchors=2"],
}
BACKGROUND = "white"


def _data(root: str) -> str:
    from train.demo_data import generate_concept_dataset

    path = os.path.join(root, "concepts")
    if not os.path.isdir(path):
        for k, (tag, attrs) in enumerate(CONCEPTS.items()):
            generate_concept_dataset(os.path.join(path, tag), tag, attrs, 64, size=32, seed=100 + k)
    return path


def _trainer(data: str, out: str, seed: int, steps: int, extra: list[str]) -> Trainer:
    cfg = load_config(None, [
        f"model.pretrained={BASE}", f"data.path={data}", "data.bucketing=false", "data.caption_dropout=0.0",
        "table.train_special=false", "table.init=normal", "training.train=table", f"training.steps={steps}",
        "training.batch_size=16", "training.lr=2e-2", "training.min_snr_gamma=0", f"training.seed={seed}",
        f"output.dir={out}",
        "output.progress=false", *extra,
    ])
    trainer = Trainer(cfg)
    return trainer


def _generate(trainer: Trainer, prompt: str, n: int, seed: int = 1000) -> list[Image.Image]:
    from diffusers import DDIMScheduler

    from unet_patch.pipeline import TagDiffusionPipeline

    config = {k: v for k, v in trainer.noise_scheduler.config.items() if not k.startswith("_")}
    pipe = TagDiffusionPipeline(unet=trainer.unet, scheduler=DDIMScheduler.from_config(config), vae=None,
                                table=trainer.table)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=20, guidance_scale=3.0, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(seed)).images


# The base renders colour, size, count and background reliably but not shape (see BENCHMARKS.md), so fidelity
# counts those; whether the shape is right too is reported separately.
FIDELITY_ATTRIBUTES = ("colour", "size")


def _faithful(image: Image.Image, attrs: dict, background: str = BACKGROUND) -> tuple[bool, bool]:
    found = detect(image)
    if found["background"] != background or len(found["objects"]) != 1:
        return False, False
    obj = found["objects"][0]
    ok = all(obj[k] == attrs[k] for k in FIDELITY_ATTRIBUTES)
    return ok, ok and obj["shape"] == attrs["shape"]


def _fidelity(trainer: Trainer, n: int) -> dict:
    scores = {}
    for tag, attrs in CONCEPTS.items():
        images = _generate(trainer, f"{tag}, {BACKGROUND} background", n)
        results = [_faithful(im, attrs) for im in images]
        scores[tag] = sum(r[0] for r in results) / n
        scores[f"{tag} incl. shape"] = sum(r[1] for r in results) / n
    scores["mean"] = sum(scores[t] for t in CONCEPTS) / len(CONCEPTS)
    scores["mean incl. shape"] = sum(scores[f"{t} incl. shape"] for t in CONCEPTS) / len(CONCEPTS)
    return scores


def _grid(images: list[list[Image.Image]], path: str, scale: int = 3) -> None:
    w, h = images[0][0].size
    grid = Image.new("RGB", (w * scale * len(images[0]), h * scale * len(images)), "white")
    for i, row in enumerate(images):
        for j, im in enumerate(row):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (j * w * scale, i * h * scale))
    grid.save(path)


def run_fidelity(out: str, seeds: list[int], steps: int, eval_every: int, n: int) -> dict:
    data = _data(out)
    results: dict = {}
    for mode, extra in MODES.items():
        runs = []
        for seed in seeds:
            started = time.time()
            trainer = _trainer(data, os.path.join(out, "runs", f"{mode}-{seed}"), seed, steps,
                               ["table.use_base_table=false", *extra])
            curve = []
            while trainer.state.step < steps:
                trainer.train_step()
                if trainer.state.step % eval_every == 0:
                    curve.append({"step": trainer.state.step, **_fidelity(trainer, n)})
            runs.append({"seed": seed, "curve": curve, "seconds": time.time() - started})
            print(f"{mode:18s} seed {seed}: fidelity {curve[-1]['mean']:.2f} ({time.time() - started:.0f} s)",
                  flush=True)
            if seed == seeds[0]:
                rows = [_generate(trainer, f"{tag}, {BACKGROUND} background", 8) for tag in CONCEPTS]
                _grid(rows, os.path.join(out, f"fidelity-{mode.replace(' ', '_').replace('+', '_')}.png"))
        results[mode] = runs
    return results


def run_bleeding_and_swap(out: str, steps: int, n: int) -> dict:
    from merge import swap

    data = _data(out)
    trainer = _trainer(data, os.path.join(out, "runs", "base-table"), 0, steps, ["table.freeze_existing=true"])
    while trainer.state.step < steps:
        trainer.train_step()
    result: dict = {"fidelity_in_base_table": _fidelity(trainer, n)}

    # bleeding: both concepts in one prompt
    images = _generate(trainer, f"mascot, badge, two objects, {BACKGROUND} background", n)
    both = 0
    for im in images:
        objs = detect(im)["objects"]
        wanted = [CONCEPTS["mascot"], CONCEPTS["badge"]]
        matched = sum(any(all(o[k] == v for k, v in w.items()) for o in objs) for w in wanted)
        both += int(len(objs) == 2 and matched == 2)
    result["bleeding"] = {"prompt": f"mascot, badge, two objects, {BACKGROUND} background",
                          "both_correct": both / n}
    _grid([images[:8]], os.path.join(out, "bleeding.png"))
    base_images = _generate(trainer, f"magenta circle, large circle, cyan square, small square, two objects, "
                                     f"{BACKGROUND} background", n)
    base_both = 0
    for im in base_images:
        objs = detect(im)["objects"]
        matched = sum(any(all(o[k] == v for k, v in w.items()) for o in objs) for w in CONCEPTS.values())
        base_both += int(len(objs) == 2 and matched == 2)
    result["bleeding_base_tags"] = {"prompt": "the same attributes with the base's own tags",
                                    "both_correct": base_both / n}

    # swap: which attributes follow the key concept, which the value concept
    table = trainer.table
    swaps = {}
    grid_rows = []
    for key, value in (("mascot", "badge"), ("badge", "mascot")):
        for layers in (None, "down.*", "up.*"):
            name = f"k-{key}-v-{value}-{layers or 'all'}"
            trainer.table = swap(table, name, key=key, value=value, layers=layers)
            images = _generate(trainer, f"{name}, {BACKGROUND} background", n)
            follow = {a: {"key": 0, "value": 0, "neither": 0} for a in ("shape", "colour", "size")}
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
    trainer.table = table
    _grid(grid_rows, os.path.join(out, "swap.png"))
    result["swap"] = swaps
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--samples", type=int, default=24, help="generated images per concept and measurement")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "detector": {size: validate(1000, size) for size in (32,)},
    }
    print("detector:", json.dumps(report["detector"]), flush=True)
    if not args.skip_fidelity:
        report["fidelity"] = run_fidelity(args.out, args.seeds, args.steps, args.eval_every, args.samples)
    report.update(run_bleeding_and_swap(args.out, args.steps, args.samples))
    report["seconds"] = time.time() - started
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "fidelity"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
