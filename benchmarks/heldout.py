"""Held-out prompts: random demo scenes with shuffled tags, scored by the detector, with 95% intervals.

The six ``base_eval`` cases are a fixed handful; these are fresh scenes drawn from a seed that no distillation or
training run draws from (``HELDOUT_SEED``), one sample each, tags in a random order. Two scores:

- one-object scenes: the fraction drawn right in every attribute (one object, background, shape, colour, size,
  position);
- two-object scenes: the fraction with two objects, the right background and both colour–shape pairs bound.

Intervals are Wilson 95% intervals; a ratio of two conditionings scored on the same scenes gets a paired bootstrap
interval (:func:`ratio_interval`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from demo.data import BACKGROUNDS, COLOURS, POSITIONS_ONE, SHAPES, SIZES, TWO_OBJECTS_TAG, object_tags
from demo.detector import check_one, detect, match_two

#: Seed of the held-out scenes (distillation draws its prompts from other seeds).
HELDOUT_SEED = 90210


def scenes(num: int, two: bool, seed: int = HELDOUT_SEED) -> list[dict]:
    """``num`` random scenes ``{"objects", "background", "prompt"}``, tags shuffled."""
    rng = np.random.default_rng([seed, int(two)])
    out = []
    for _ in range(num):
        def obj(position):
            return {"shape": SHAPES[rng.integers(3)], "colour": tuple(COLOURS)[rng.integers(len(COLOURS))],
                    "size": SIZES[rng.integers(2)], "position": position}
        if two:
            while True:
                objects = [obj("left"), obj("right")]
                if (objects[0]["shape"], objects[0]["colour"]) != (objects[1]["shape"], objects[1]["colour"]):
                    break
        else:
            objects = [obj(POSITIONS_ONE[rng.integers(3)])]
        background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        tags = list(dict.fromkeys([t for o in objects for t in object_tags(o)]
                                  + ([TWO_OBJECTS_TAG] if two else []) + [f"{background} background"]))
        tags = [tags[i] for i in rng.permutation(len(tags))]
        out.append({"objects": objects, "background": background, "prompt": ", ".join(tags)})
    return out


def right(scene: dict, image) -> bool:
    """One-object scene: every attribute right; two-object scene: two objects, background, both pairs bound."""
    found = detect(image)
    if len(scene["objects"]) == 1:
        return bool(check_one(found, scene["objects"][0], scene["background"])["all"])
    if len(found["objects"]) != 2 or found["background"] != scene["background"]:
        return False
    best = match_two(found["objects"], scene["objects"])
    return all(best[i]["colour"] == scene["objects"][i]["colour"] and best[i]["shape"] == scene["objects"][i]["shape"]
               for i in range(2))


def wilson(hits: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def ratio_interval(student: list[bool], teacher: list[bool], draws: int = 2000, seed: int = 0) -> tuple:
    """Paired bootstrap 95% interval of ``mean(student) / mean(teacher)`` over the same scenes."""
    s, t = np.asarray(student, float), np.asarray(teacher, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(draws, len(s)))
    ratios = s[idx].mean(1) / np.maximum(t[idx].mean(1), 1e-9)
    return (float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975)))


def summary(hits: list[bool]) -> dict:
    """``{"right", "low", "high", "n"}``: the fraction right and its Wilson interval."""
    lo, hi = wilson(sum(hits), len(hits))
    return {"right": sum(hits) / max(len(hits), 1), "low": lo, "high": hi, "n": len(hits)}


def run_scenes(sample, scene_list: list[dict], batch: int = 64) -> list[bool]:
    """Score ``sample(prompts, seed) -> images`` on scenes (one image each, batches seeded by their start)."""
    hits = []
    for start in range(0, len(scene_list), batch):
        chunk = scene_list[start:start + batch]
        images = sample([s["prompt"] for s in chunk], start)
        hits += [right(s, np.asarray(im)) for s, im in zip(chunk, images)]
    return hits


def stock_embeds_sampler(pipe, steps: int = 25, guidance: float = 3.0):
    """``(prompt_embeds (B, 77, D), seed) -> images`` through a stock ``StableDiffusionPipeline``."""
    null = pipe.encode_prompt([""], "cpu", 1, False)[0]  # (1, 77, D)

    def sample(embeds: torch.Tensor, seed: int):
        n, length = embeds.shape[:2]  # a longer sequence's negative: the null one, its last row repeated
        negative = torch.cat([null, null[:, -1:].expand(1, length - null.shape[1], -1)], 1).expand(n, -1, -1)
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed)).images

    return sample


def prompt_sampler(pipe, steps: int = 25, guidance: float = 3.0):
    """``(prompts, seed) -> images`` through a pipeline that takes prompts: diffusers' stock
    ``StableDiffusionPipeline`` (with its text encoder) or condvec's ``TagDiffusionPipeline``."""
    def sample(prompts, seed):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed)).images
    return sample
