"""Training a table larger than memory: ``training.table_device: disk`` on a 100k-tag SDXL ``layers`` table and a
1M-tag SD1.5 ``single`` table, with their peak RSS.

    python -m benchmarks.disk_train [--family sdxl|sd15|both] [--tags N] [--steps 20] [--dir DIR] [--keep]

For each family it writes (streamed, never held in memory) a synthetic fp16 table in the layout of the real model —
SDXL: 70 attn2 layers × 2048 plus 1280-wide pooled rows; SD1.5: one 768-wide vector for all 16 layers — and a model
folder whose UNet has the real model's block structure, layer names and cross-attention widths but narrow channels
(the real UNets' weights, 10 GiB for SDXL, are not what this measures). Then, in a fresh process, ``condvec-train``'s
``Trainer`` runs ``--steps`` steps of batch 4 on 8 captioned images (tags drawn from all over the table, one tag new
to it), checkpoints at the halfway step and at the end (each checkpoint holds only the rows the run touched), and
streams the final table out; the process reports its peak RSS (``VmHWM``), the time of each phase and the file
sizes. Then, in another fresh process, the time to ``TagTable.open`` the written table and encode one 8-tag prompt.
Prints one JSON object; every table it wrote is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

FAMILIES = {"sdxl": {"tags": 100_000, "groups": "layers"}, "sd15": {"tags": 1_000_000, "groups": "single"}}

_TRAIN = """
import json, os, sys, time
t0 = time.perf_counter()
from train.config import load_config
from train.loop import Trainer
import train.checkpoint as ckpt
folder, steps = sys.argv[1], int(sys.argv[2])
cfg = load_config(None, [f"model.pretrained={folder}/model", f"data.path={folder}/data", "data.resolution=32",
                         "data.bucketing=false", f"table.start_from={folder}/table.safetensors",
                         "training.table_device=disk", f"training.steps={steps}", "training.batch_size=4",
                         "training.num_threads=1", f"output.dir={folder}/run", f"output.save_every={steps // 2}",
                         "output.sample_every=0", "output.progress=false", "output.keep_last=2"])
trainer = Trainer(cfg)
built = time.perf_counter()
step_times = []
while trainer.state.step < steps:
    m = trainer.train_step()
    step_times.append(m["step_time"])
    if trainer.state.step == steps // 2:
        saved = time.perf_counter(); trainer.save(); save_s = time.perf_counter() - saved
trained = time.perf_counter()
trainer.save()
out = ckpt.export_trainer(trainer)
done = time.perf_counter()
last = ckpt.list_checkpoints(cfg.output.dir)[-1]
status = open("/proc/self/status").read()
print(json.dumps({
    "setup_s": built - t0, "step_s_median": sorted(step_times)[len(step_times) // 2], "steps": len(step_times),
    "checkpoint_s": save_s, "final_save_and_export_s": done - trained,
    "held_rows": trainer.table.data.held_count,
    "checkpoint_mib": sum(os.path.getsize(os.path.join(last, f)) for f in os.listdir(last)) / 2**20,
    "exported_gib": os.path.getsize(out["table"]) / 2**30,
    "peak_rss_gib": int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))) / 2**20}))
"""

_OPEN = """
import json, sys, time
t0 = time.perf_counter()
from conditioner import TagTable, encode
imported = time.perf_counter()
table = TagTable.open(sys.argv[1])
opened = time.perf_counter()
cond = encode(table, [", ".join(table.tags[i] for i in range(0, len(table.tags), len(table.tags) // 8))])
done = time.perf_counter()
status = open("/proc/self/status").read()
print(json.dumps({"open_s": opened - imported, "encode_s": done - opened, "cond_shape": list(cond.shape),
                  "peak_rss_gib": int(next(l.split()[1] for l in status.splitlines()
                                           if l.startswith("VmHWM"))) / 2**20}))
"""


class _Tiled:
    """Rows ``i`` → ``block[i % len(block)]``: a table's worth of rows that is never in memory at once."""

    def __init__(self, block, rows: int):
        self.block, self.shape = block, (rows, *block.shape[1:])

    def __getitem__(self, index):
        return self.block[index % self.block.shape[0]]


def write_model(folder: str, family: str) -> None:
    """A UNet with the real block structure and cross-attention widths (narrow channels), a tiny VAE, a scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 1280, norm_num_groups=8)
    else:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8)
    unet.save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), scaling_factor=0.13025 if family == "sdxl" else 0.18215,
                  ).save_pretrained(os.path.join(folder, "vae"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(os.path.join(folder, "scheduler"))


def write_table(path: str, model: str, family: str, tags: int) -> float:
    """A synthetic fp16 table of ``tags`` tags for ``model``'s UNet, streamed to ``path``; returns its GiB."""
    import torch

    from conditioner import TagTable
    from unet_patch.discover import discover
    from unet_patch.load import load_model

    layers = discover(load_model(model, with_text_encoders=False).unet)
    table = TagTable.create(layers, groups=FAMILIES[family]["groups"], pad_to=77,
                            base_model={"family": "sdxl" if family == "sdxl" else "sd1"})
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1024, 1, table.width, generator=gen) * 0.02
    names = [f"tag {i}" for i in range(tags)]
    changes = {"tags": names, "data": torch.empty((tags, 1, table.width), device="meta")}
    source = SimpleNamespace(data=_Tiled(block, tags), pooled=None, source=None)
    if family == "sdxl":
        changes |= {"pooled": torch.empty((tags, 1280), device="meta"), "null_pooled": torch.zeros(1280),
                    "negative_zeros": True}
        source.pooled = _Tiled(torch.randn(1024, 1280, generator=gen) * 0.02, tags)
    skeleton = table.replace(**changes)
    skeleton.save_streamed(path, source, range(tags), dtype="fp16")
    return os.path.getsize(path) / 2**30


def write_data(folder: str, tags: int) -> None:
    """8 images captioned with tags from all over the table (and one tag new to it)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 128)).save(os.path.join(folder, f"{i}.png"))
        picked = [f"tag {(i * 7919 + k * 104729) % tags}" for k in range(3)]
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(", ".join(picked + (["brand new tag"] if i % 2 else [])) + "\n")


def run_family(family: str, tags: int, steps: int, root: str, keep: bool) -> dict:
    folder = os.path.join(root, f"disk-{family}-{tags}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    result = {"family": family, "tags": tags, "groups": FAMILIES[family]["groups"]}
    try:
        started = time.perf_counter()
        write_model(os.path.join(folder, "model"), family)
        result["table_gib"] = round(write_table(os.path.join(folder, "table.safetensors"),
                                                os.path.join(folder, "model"), family, tags), 2)
        result["write_s"] = round(time.perf_counter() - started, 1)
        write_data(os.path.join(folder, "data"), tags)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        run = subprocess.run([sys.executable, "-c", _TRAIN, folder, str(steps)], capture_output=True, text=True,
                             env=env)
        if run.returncode:
            raise SystemExit(f"training failed:\n{run.stderr[-3000:]}")
        result["train"] = json.loads(run.stdout.strip().splitlines()[-1])
        table = os.path.join(folder, "run", "table.safetensors")
        run = subprocess.run([sys.executable, "-c", _OPEN, table], capture_output=True, text=True, env=env,
                             check=True)
        result["open_trained"] = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.disk_train", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sdxl", "sd15", "both"), default="both")
    parser.add_argument("--tags", type=int, default=None, help="tags (default: 100k SDXL, 1M SD1.5)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the tables are written")
    parser.add_argument("--keep", action="store_true", help="keep the tables and runs")
    args = parser.parse_args(argv)
    families = ["sdxl", "sd15"] if args.family == "both" else [args.family]
    results = [run_family(f, args.tags or FAMILIES[f]["tags"], args.steps, args.dir, args.keep) for f in families]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
