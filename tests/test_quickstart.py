"""The README's main job on the embedded base (slow: run with `python -m pytest -m slow`)."""

from pathlib import Path

import pytest
import torch

from conditioner.table import TagTable
from conditioner.table_layout import Layout
from demo.detector import detect

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_the_new_concepts(tmp_path, monkeypatch):
    from demo.data import main as demo_data
    from train.cli import main
    from unet_patch import TagDiffusionPipeline

    monkeypatch.chdir(ROOT)
    out = tmp_path / "quickstart"
    assert demo_data([str(tmp_path / "data"), "--num", "64", "--concept", "mascot=large magenta circle",
                      "--concept", "badge=small cyan square"]) == 0  # as make quickstart writes them
    assert main(["configs/quickstart.yaml", f"output.dir={out}", f"data.path={tmp_path / 'data'}",
                 "output.progress=false"]) == 0
    from omegaconf import OmegaConf

    steps = OmegaConf.load(ROOT / "configs" / "quickstart.yaml").training.steps
    for name in ("table.safetensors", "loss.png", f"samples/step-{steps:07d}.png"):
        assert (out / name).exists(), name
    pipe = TagDiffusionPipeline.from_pretrained(ROOT / "models" / "mini-sd", table=str(out / "table.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    for prompt, colour, size in (("mascot, white background", "magenta", "large"),
                                 ("badge, white background", "cyan", "small")):
        images = pipe(prompt, num_inference_steps=20, guidance_scale=3.0, num_images_per_prompt=16,
                      generator=torch.Generator().manual_seed(1)).images
        right = 0
        for image in images:
            objects = detect(image)["objects"]
            right += int(len(objects) == 1 and objects[0]["colour"] == colour and objects[0]["size"] == size)
        assert right >= 12, f"only {right}/16 {prompt!r} samples are one {size} {colour} object"
    # the run started from the model's distilled table: its tags are all there, and the new ones are blocks alike
    base, table = TagTable.load(ROOT / "models" / "mini-sd" / "table" / "table.safetensors"), pipe.table
    assert set(table.names) == set(base.names) | {"mascot", "badge"}
    assert len(table.expand("mascot")) == len(table.expand("red circle")) == Layout.of(base).vectors
