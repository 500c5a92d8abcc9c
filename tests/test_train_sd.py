"""condvec-train on tiny SD1.5 and SDXL stand-ins with the shipped templates: the table bootstraps from the model's
own CLIP, trains (SDXL: pooled vectors and per-sample time ids, buckets of different sizes), and generates."""

import pytest
import torch
from PIL import Image
from standins import make_sd15, make_sdxl

from bootstrap.text import null_sequence, tag_vectors
from conditioner import TagTable, encode
from train.cli import main
from unet_patch import TagDiffusionPipeline
from unet_patch.load import load_model

TEMPLATES = {"sd15": ("configs/sd15.yaml", make_sd15), "sdxl": ("configs/sdxl.yaml", make_sdxl)}


def _dataset(folder):
    folder.mkdir()
    colours = ["red", "blue", "green"]
    for i, (w, h) in enumerate([(64, 64), (180, 60), (60, 180), (128, 128), (64, 64), (180, 60)]):
        Image.new("RGB", (w, h), colours[i % 3]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{colours[i % 3]}, cat" + (", zqxv" if i % 2 else ""))
    return folder


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_template_trains_from_the_models_own_clip_and_generates(family, tmp_path, capsys):
    config, make = TEMPLATES[family]
    model_dir = make(tmp_path)
    data = _dataset(tmp_path / "data")
    out = tmp_path / "run"
    code = main([config, f"model.pretrained={model_dir}", f"data.path={data}", "data.resolution=128",
                 "data.bucket_step=8", "data.max_aspect=3", "training.steps=3", "training.batch_size=2",
                 "training.lr=0.05", "data.caption_dropout=0", "training.ema_decay=0.5",
                 "training.gradient_checkpointing=false", f"output.dir={out}", "output.progress=false",
                 "output.sample_every=0", "output.sample_prompts=[]", "output.save_every=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "bootstrapped from" in printed and "start from" in printed
    assert " in 1 bucket" not in printed  # several bucket sizes: each sample has its own size and crop
    table = TagTable.load(out / "table.safetensors")
    model = load_model(model_dir)
    null = null_sequence(model)
    assert torch.equal(table.special[:, 0, :table.dim], null.sequence)  # a bootstrapped null sequence stays frozen
    assert "the base model's own null sequence" in printed
    start = tag_vectors(model, table.tags, progress=False)
    changed = [not torch.equal(table.data[i, 0, :table.dim], start.vectors[i, 0]) for i in range(len(table))]
    assert all(changed), "every tag in the data trained"
    if family == "sdxl":
        assert table.pooled is not None
        moved = [not torch.equal(table.pooled[i], start.pooled[i]) for i in range(len(table))]
        assert all(moved), "each tag's pooled vector received gradient"
        assert torch.equal(table.null_pooled, null.pooled) and table.negative_zeros
        ema = TagTable.load(out / "table-ema.safetensors")  # pooled vectors are averaged with their rows
        assert all(not torch.equal(ema.pooled[i], table.pooled[i]) and not torch.equal(ema.pooled[i], start.pooled[i])
                   for i in range(len(table)))
    pipe = TagDiffusionPipeline(unet=model.unet, scheduler=model.scheduler, vae=model.vae, table=table)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("red, cat", num_inference_steps=2, output_type="np", height=64, width=96).images
    assert image.shape == (1, 64, 96, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert encode(table, ["red, cat"]).shape[1] == 77


def test_start_from_another_layout_converts_and_unet_config_pretrains(tmp_path, capsys):
    import json

    from demo.data import generate_demo_dataset
    from train.model import MICRO_UNET

    data = tmp_path / "data"
    generate_demo_dataset(str(data), 8, size=32, seed=0)
    (tmp_path / "unet.json").write_text(json.dumps(MICRO_UNET))
    common = [f"data.path={data}", "data.resolution=16", "training.steps=1", "training.batch_size=2",
              "output.progress=false", "output.sample_every=0"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main([str(empty), f"model.unet_config={tmp_path / 'unet.json'}", "table.groups=single",
                 f"output.dir={tmp_path / 'a'}", *common]) == 0
    single = TagTable.load(tmp_path / "a" / "table.safetensors")
    assert single.group_names == ["all"] and single.base_model["name"] == "unet"
    model_dir = tmp_path / "a" / "model"
    start = tmp_path / "a" / "table.safetensors"
    assert main([str(empty), f"model.unet_config={tmp_path / 'unet.json'}", f"table.start_from={start}",
                 "table.groups=layers", f"output.dir={tmp_path / 'b'}", *common]) == 0
    assert "converted from single to layers groups" in capsys.readouterr().out
    layers = TagTable.load(tmp_path / "b" / "table.safetensors")
    assert len(layers.group_names) == len(layers.layers) and layers.tags == single.tags
    assert not model_dir.exists()  # table-only training writes no model
