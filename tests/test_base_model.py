"""The shipped base model (models/tiny-base) loads and generates the attributes its tags name.

Checked per sample with the attribute detector: background, exactly one object, its colour and its position. The
tiny base draws blobs rather than clean shapes (measured in BENCHMARKS.md), so shape and size are not asserted.
"""

from pathlib import Path

import pytest
import torch

from benchmarks.detector import detect
from unet_patch import TagDiffusionPipeline

BASE = Path(__file__).resolve().parents[1] / "models" / "tiny-base"
N = 8

CASES = [
    ("red circle, large circle, circle on center, white background", "white", {"colour": "red", "position": "center"}),
    ("blue square, small square, square on left, black background", "black", {"colour": "blue", "position": "left"}),
    ("yellow triangle, large triangle, triangle on right, gray background",
     "gray", {"colour": "yellow", "position": "right"}),
    ("green circle, small circle, circle on right, white background",
     "white", {"colour": "green", "position": "right"}),
]


@pytest.fixture(scope="module")
def pipe():
    assert (BASE / "model_index.json").exists(), "the embedded base model is missing from models/tiny-base"
    pipe = TagDiffusionPipeline.from_pretrained(BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_is_small_and_self_contained(pipe):
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"models/tiny-base is {size / 2**20:.1f} MB"
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    assert len(pipe.table) >= 37 and "red circle" in pipe.table


@pytest.mark.parametrize("prompt, background, attributes", CASES)
def test_base_generates_the_named_attributes(pipe, prompt, background, attributes):
    images = pipe(prompt, num_inference_steps=25, guidance_scale=3.0, num_images_per_prompt=N,
                  generator=torch.Generator().manual_seed(0)).images
    right = 0
    for image in images:
        found = detect(image)
        right += int(found["background"] == background and len(found["objects"]) == 1
                     and all(found["objects"][0][k] == v for k, v in attributes.items()))
    assert right >= N * 3 // 4, f"{prompt!r}: only {right}/{N} samples have every attribute right"
