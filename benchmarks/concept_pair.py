"""Two learned concepts in one prompt: the quickstart's ``mascot`` and ``badge`` drawn together.

    python -m benchmarks.concept_pair [--table runs/quickstart/table.safetensors] [--model models/mini-sd] [--num 48]
        [--out FILE.json]

Each condition draws ``--num`` samples (same seeds, 25 DDIM steps, guidance 3) of a two-object prompt, tags in both
orders, and the detector scores them: right = exactly two objects on a white background, one a large magenta circle
(``mascot``) and the other a small cyan square (``badge``). Conditions:

- ``condvec tags``: ``mascot, badge, two objects, white background`` through the table (``TagDiffusionPipeline``);
- ``CLIP, in words``: the base's own CLIP asked for the same two objects with the caption tags it was trained on
  (``magenta circle, large circle, cyan square, small square, two objects, white background``, stock pipeline) — what
  the model can draw when asked in its own words, the ceiling for the learned concepts;
- ``condvec, in words``: the same words through the table.

Prints (and writes) one JSON object with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json

import torch

CONCEPTS = {"mascot": {"colour": "magenta", "shape": "circle", "size": "large"},
            "badge": {"colour": "cyan", "shape": "square", "size": "small"}}
WORDS = {"mascot": "magenta circle, large circle", "badge": "cyan square, small square"}


def both_right(image) -> bool:
    """Exactly two objects on white, one of them each concept (colour, shape and size)."""
    from demo.detector import detect

    found = detect(image)
    objects = found["objects"]
    if len(objects) != 2 or found["background"] != "white":
        return False
    def fits(obj, want):
        return all(obj[k] == v for k, v in want.items())
    a, b = CONCEPTS.values()
    return (fits(objects[0], a) and fits(objects[1], b)) or (fits(objects[0], b) and fits(objects[1], a))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concept_pair", description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="runs/quickstart/table.safetensors")
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--num", type=int, default=48)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline

    from benchmarks.heldout import wilson
    from unet_patch import TagDiffusionPipeline

    ours = TagDiffusionPipeline.from_pretrained(args.model, table=args.table)
    stock = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                    local_files_only=True)
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    conditions = {
        "condvec tags": (ours, ["mascot, badge, two objects, white background",
                                "badge, mascot, white background, two objects"]),
        "CLIP, in words": (stock, [f"{WORDS['mascot']}, {WORDS['badge']}, two objects, white background",
                                   f"{WORDS['badge']}, {WORDS['mascot']}, white background, two objects"]),
        "condvec, in words": (ours, [f"{WORDS['mascot']}, {WORDS['badge']}, two objects, white background",
                                     f"{WORDS['badge']}, {WORDS['mascot']}, white background, two objects"]),
    }
    result = {"samples": args.num, "table": args.table}
    for name, (pipe, prompts) in conditions.items():
        hits = 0
        for i, prompt in enumerate(prompts):  # half the samples in each tag order
            count = args.num // len(prompts)
            images = pipe(prompt, num_inference_steps=25, guidance_scale=3.0, num_images_per_prompt=count,
                          generator=torch.Generator().manual_seed(i)).images
            hits += sum(both_right(image) for image in images)
        n = args.num // len(prompts) * len(prompts)
        result[name] = {"both right": hits / n, "interval": [round(x, 3) for x in wilson(hits, n)], "n": n}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
