"""Attribute accuracy of a base model on prompts of known tags, read back by the detector.

    python -m benchmarks.base_eval [--model models/tiny-base] [--guidance 3] [--steps 25] [--num 8]

One-object prompts: fraction of samples with each attribute right (and all of them). Two-object prompts: fraction
of samples with two objects, and with both objects right in every attribute (binding: ``red circle, blue square``
must not give a blue circle).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.detector import detect
from unet_patch import TagDiffusionPipeline

CASES = [("red", "circle", "large", "center", "white"), ("blue", "square", "small", "left", "black"),
         ("yellow", "triangle", "large", "right", "gray"), ("green", "circle", "small", "right", "white"),
         ("magenta", "square", "large", "center", "gray"), ("cyan", "triangle", "small", "left", "black")]
TWO_CASES = [
    ((("red", "circle", "large", "left"), ("blue", "square", "small", "right")), "white"),
    ((("yellow", "triangle", "small", "left"), ("green", "circle", "large", "right")), "black"),
    ((("cyan", "square", "large", "left"), ("magenta", "triangle", "small", "right")), "gray"),
]
ATTRS = ("colour", "shape", "size", "position")


def one_object_prompt(colour: str, shape: str, size: str, position: str, background: str) -> str:
    """The caption the demo data would give this one-object scene."""
    return f"{colour} {shape}, {size} {shape}, {shape} on {position}, {background} background"


def two_object_prompt(objects, background: str) -> str:
    """The caption the demo data would give this two-object scene."""
    tags = [f"{c} {s}, {z} {s}, {s} on {p}" for c, s, z, p in objects]
    return ", ".join(tags) + f", two objects, {background} background"


def evaluate(model: str, guidance: float, steps: int, num: int) -> dict:
    """Fraction of samples with each attribute right (one-object prompts) and both objects right (two-object)."""
    pipe = TagDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompt):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num,
                    generator=torch.Generator().manual_seed(0)).images

    totals = dict.fromkeys(("background", "one object", "colour", "position", "size", "shape", "all"), 0)
    n = 0
    for colour, shape, size, position, background in CASES:
        for image in sample(one_object_prompt(colour, shape, size, position, background)):
            found = detect(image)
            n += 1
            obj = found["objects"][0] if found["objects"] else {}
            right = {"background": found["background"] == background, "one object": len(found["objects"]) == 1,
                     "colour": obj.get("colour") == colour, "position": obj.get("position") == position,
                     "size": obj.get("size") == size, "shape": obj.get("shape") == shape}
            right["all"] = all(right.values())
            for key, value in right.items():
                totals[key] += int(value)
    result = {key: value / n for key, value in totals.items()} | {"samples": n}

    two = dict.fromkeys(("two objects", "colours bound", "both right"), 0)
    m = 0
    for objects, background in TWO_CASES:
        wanted = [dict(zip(ATTRS, o)) for o in objects]
        for image in sample(two_object_prompt(objects, background)):
            m += 1
            found = detect(image)
            if len(found["objects"]) != 2 or found["background"] != background:
                continue
            two["two objects"] += 1
            best = max(itertools.permutations(found["objects"]),
                       key=lambda p: sum(p[i][a] == wanted[i][a] for i in range(2) for a in ATTRS))
            two["colours bound"] += int(all(best[i]["colour"] == wanted[i]["colour"]
                                            and best[i]["shape"] == wanted[i]["shape"] for i in range(2)))
            two["both right"] += int(all(best[i][a] == wanted[i][a] for i in range(2) for a in ATTRS))
    result["two-object prompts"] = {key: value / m for key, value in two.items()} | {"samples": m}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.base_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-base")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num", type=int, default=8)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.model, args.guidance, args.steps, args.num)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
