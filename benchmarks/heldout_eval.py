"""CLIP against condvec tables on held-out prompts (random scenes, tags shuffled), with 95% intervals.

    python -m benchmarks.heldout_eval [--model models/mini-sd] [--num 96] TABLE [TABLE …] [--out FILE.json]

Every conditioning is scored on the same scenes and seeds (:mod:`benchmarks.heldout`): the model's own CLIP through
diffusers' stock ``StableDiffusionPipeline``, each table through condvec's ``TagDiffusionPipeline``. For a table,
"of CLIP" is its score over CLIP's, with a paired bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.heldout import prompt_sampler, ratio_interval, run_scenes, scenes, summary


def evaluate(model: str, tables: list[str], num: int, steps: int = 25, guidance: float = 3.0) -> dict:
    """``{"clip": …, TABLE: …}``: per kind (one-object, two-object) the fraction right, its interval, of CLIP."""
    from diffusers import StableDiffusionPipeline

    from unet_patch import TagDiffusionPipeline

    kinds = {"one-object": scenes(num, two=False), "two-object": scenes(num, two=True)}
    stock = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                    local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    clip_hits = {kind: run_scenes(prompt_sampler(stock, steps, guidance), s) for kind, s in kinds.items()}
    results = {"clip": {kind: summary(h) for kind, h in clip_hits.items()}}
    for table in tables:
        pipe = TagDiffusionPipeline.from_pretrained(model, table=table)
        pipe.set_progress_bar_config(disable=True)
        began = time.perf_counter()
        results[table] = {}
        for kind, s in kinds.items():
            hits = run_scenes(prompt_sampler(pipe, steps, guidance), s)
            results[table][kind] = summary(hits) | {"of CLIP": ratio_interval(hits, clip_hits[kind]),
                                                    "of CLIP point": sum(hits) / max(sum(clip_hits[kind]), 1)}
        results[table]["seconds"] = round(time.perf_counter() - began, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout_eval", description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", metavar="TABLE")
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--num", type=int, default=96, help="held-out scenes of each kind")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = evaluate(args.model, args.tables, args.num)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for name, row in result.items():
        print(name, {k: (round(v["right"], 3), round(v["low"], 3), round(v["high"], 3),
                         [round(x, 3) for x in v.get("of CLIP", [])]) for k, v in row.items() if k != "seconds"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
