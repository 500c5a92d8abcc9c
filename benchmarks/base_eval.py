"""Attribute accuracy of a base model on one-object prompts of known tags, read back by the detector.

    python -m benchmarks.base_eval [--model models/tiny-base] [--guidance 3] [--steps 25] [--num 8]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.detector import detect
from unet_patch import TagDiffusionPipeline

CASES = [("red", "circle", "large", "center", "white"), ("blue", "square", "small", "left", "black"),
         ("yellow", "triangle", "large", "right", "gray"), ("green", "circle", "small", "right", "white"),
         ("magenta", "square", "large", "center", "gray"), ("cyan", "triangle", "small", "left", "black")]


def evaluate(model: str, guidance: float, steps: int, num: int) -> dict:
    """Fraction of samples with each attribute right (and all of them)."""
    pipe = TagDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    totals = dict.fromkeys(("background", "one object", "colour", "position", "size", "shape", "all"), 0)
    n = 0
    for colour, shape, size, position, background in CASES:
        prompt = f"{colour} {shape}, {size} {shape}, {shape} on {position}, {background} background"
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num,
                      generator=torch.Generator().manual_seed(0)).images
        for image in images:
            found = detect(image)
            n += 1
            obj = found["objects"][0] if found["objects"] else {}
            right = {"background": found["background"] == background, "one object": len(found["objects"]) == 1,
                     "colour": obj.get("colour") == colour, "position": obj.get("position") == position,
                     "size": obj.get("size") == size, "shape": obj.get("shape") == shape}
            right["all"] = all(right.values())
            for key, value in right.items():
                totals[key] += int(value)
    return {key: value / n for key, value in totals.items()} | {"samples": n}


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
