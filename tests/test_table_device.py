"""training.table_device=host trains to the same table as a table on the accelerator; num_threads is applied.

On a CPU-only machine host and accelerator are one device: this runs the host path (rows copied out, gradients and
updates brought back to where the table lives) and checks it changes nothing; a GPU run moves real bytes."""

import torch

from conditioner import TagTable
from train.cli import main


def test_host_resident_table_trains_to_the_same_result(tmp_path):
    from demo.data import generate_demo_dataset

    data = tmp_path / "data"
    generate_demo_dataset(str(data), 8, size=32, seed=0)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    common = [str(empty), "model.builtin=micro", f"data.path={data}", "data.resolution=16", "training.steps=3",
              "training.batch_size=4", "training.ema_decay=0.9", "training.num_threads=1", "output.progress=false",
              "output.sample_every=0"]  # the same thread count: float reductions depend on it
    threads = torch.get_num_threads()
    try:
        assert main([*common, f"output.dir={tmp_path / 'acc'}"]) == 0
        assert main([*common, f"output.dir={tmp_path / 'host'}", "training.table_device=host"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for name in ("table.safetensors", "table-ema.safetensors"):
        a, b = TagTable.load(tmp_path / "acc" / name), TagTable.load(tmp_path / "host" / name)
        assert torch.equal(a.data, b.data) and torch.equal(a.special, b.special)
    start = TagTable.load(tmp_path / "acc" / "checkpoints" / "step-0000003" / "table.safetensors")
    assert start.tags == a.tags
