"""The embedded miniature SD (models/mini-sd) is a real SD1.x folder, and draws what its prompts name.

Diffusers' own ``StableDiffusionPipeline`` runs it with its own CLIP text encoder; the detector reads every sample.
A subset of ``python -m benchmarks.base_eval --model models/mini-sd`` (fixed seeds, under a minute): the full
benchmark and its learning curve are in BENCHMARKS.md ("Miniature SD").
"""

import json
from pathlib import Path

import pytest
import torch

from demo.detector import ATTRIBUTES, check_one, detect, match_two

BASE = Path(__file__).resolve().parents[1] / "models" / "mini-sd"
N = 8  # samples per one-object prompt
N_TWO = 16  # samples per two-object prompt
ONE = [("red", "circle", "large", "center", "white"), ("blue", "square", "small", "left", "black"),
       ("yellow", "triangle", "large", "right", "gray"), ("green", "circle", "small", "right", "white")]
TWO = [((("red", "circle", "large", "left"), ("blue", "square", "small", "right")), "white"),
       ((("cyan", "square", "large", "left"), ("magenta", "triangle", "small", "right")), "gray")]
# One-object prompts: the thresholds the model was built to (shape >= 90%, every attribute >= 85%); the shipped model
# gets all 32 samples right. Two-object binding: the shipped model binds both colour-shape pairs in 14 of these 32
# samples (44%; 48% over the benchmark's 48): short of the 70% it was aimed at (BENCHMARKS.md, "Miniature SD"), so
# this guards the level it reached, with a margin of four samples.
MIN_SHAPE, MIN_ATTRIBUTE, MIN_ALL, MIN_BOUND = 0.90, 0.85, 0.85, 10 / 32


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert (BASE / "model_index.json").exists(), "the embedded miniature SD is missing from models/mini-sd"
    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, prompt, num: int = N):
    return pipe(prompt, num_inference_steps=25, guidance_scale=3.0, num_images_per_prompt=num,
                generator=torch.Generator().manual_seed(0)).images


def test_mini_sd_is_an_sd1_folder_that_ships_in_the_repo():
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        assert (BASE / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).is_file(), sub
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (BASE / "tokenizer").iterdir()}
    index = json.loads((BASE / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"][1] == "CLIPTextModel"
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"models/mini-sd is {size / 2**20:.1f} MB"


def test_family_detection_and_bootstrap_take_it_as_sd15():
    from bootstrap.table import bootstrap_table
    from unet_patch.load import load_model

    model = load_model(BASE)
    assert model.family == "sd1" and len(model.text_encoders) == 1
    table = bootstrap_table(model, ["red circle", "blue square", "cyan triangle"], progress=False)
    assert table.special.shape[0] == 77 and table.base_model["family"] == "sd1"
    assert not torch.equal(table.data[0], table.data[1])


def test_stock_pipeline_draws_the_named_attributes(pipe):
    checks = []
    for colour, shape, size, position, background in ONE:
        prompt = f"{colour} {shape}, {size} {shape}, {shape} on {position}, {background} background"
        want = {"colour": colour, "shape": shape, "size": size, "position": position}
        checks += [check_one(detect(image), want, background) for image in _sample(pipe, prompt)]
    rate = {key: sum(c[key] for c in checks) / len(checks) for key in checks[0]}
    assert rate["shape"] >= MIN_SHAPE, rate
    assert all(rate[a] >= MIN_ATTRIBUTE for a in ("one object", "background", *ATTRIBUTES)), rate
    assert rate["all"] >= MIN_ALL, rate


def test_stock_pipeline_binds_colours_to_shapes_in_two_object_scenes(pipe):
    bound = total = 0
    for objects, background in TWO:
        prompt = ", ".join(f"{c} {s}, {z} {s}, {s} on {p}" for c, s, z, p in objects)
        prompt += f", two objects, {background} background"
        wanted = [dict(zip(("colour", "shape", "size", "position"), o)) for o in objects]
        for image in _sample(pipe, prompt, N_TWO):
            total += 1
            found = detect(image)
            if len(found["objects"]) == 2 and found["background"] == background:
                best = match_two(found["objects"], wanted)
                bound += all(best[i]["colour"] == wanted[i]["colour"] and best[i]["shape"] == wanted[i]["shape"]
                             for i in range(2))
    assert bound / total >= MIN_BOUND, f"{bound}/{total} two-object samples have both colour-shape pairs right"
