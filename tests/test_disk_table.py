"""``training.table_device: disk``: a table file trained through a memory map, only touched rows in memory.

It must equal in-memory training bit for bit, checkpoint only the rows it holds, resume exactly (also after a SIGKILL
while a checkpoint or the final table is being written), and never write the table file it maps.
"""

import hashlib
import json
import os

import pytest
import torch
from testkit import micro_config, run_until_killed

from conditioner import TagTable
from conditioner.errors import CondvecError
from conditioner.rows import DiskRows
from demo.data import generate_demo_dataset
from train.loop import Trainer

EXTRA = ("training.lr=0.05", "training.weight_decay=0.1", "training.ema_decay=0.9", "data.caption_dropout=0.2",
         "data.flip=true", "training.grad_accum=2", "output.keep_last=2")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A trained micro table with 200 extra tags the data never uses (rows a disk run must leave unread), fp16."""
    root = tmp_path_factory.mktemp("disk")
    data = root / "data"
    generate_demo_dataset(data, 24, size=32, seed=3)
    first = Trainer(micro_config(data, root / "first", "training.lr=0.05", steps=2)).run()
    table = TagTable.load(first["table"])
    table.add_tags([f"unused {i}" for i in range(200)], init="normal", std=0.3, seed=9)
    path = root / "start.safetensors"
    table.save(path, dtype="fp16")
    # the data gains tags the start table lacks: appended rows, held in memory
    extra = data / "extra"
    generate_demo_dataset(extra, 8, size=32, seed=4)
    for caption in extra.glob("*.txt"):
        caption.write_text(caption.read_text().strip() + ", sparkle\n")
    return data, path


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cfg(data, start_path, out, *extra, steps=6):
    return micro_config(data, out, *EXTRA, f"table.start_from={start_path}", *extra, steps=steps)


def test_disk_training_equals_in_memory_training_bit_for_bit(start, tmp_path):
    data, path = start
    before = _digest(path)
    memory = Trainer(_cfg(data, path, tmp_path / "memory")).run()
    disk_trainer = Trainer(_cfg(data, path, tmp_path / "disk", "training.table_device=disk"))
    assert isinstance(disk_trainer.table.data, DiskRows)
    disk = disk_trainer.run()
    a, b = TagTable.load(memory["table"]), TagTable.load(disk["table"])
    assert a.tags == b.tags and "sparkle" in a.tags
    # the disk run writes the mapped file's precision (fp16); the in-memory run fp32: compare at fp16
    assert torch.equal(a.data.half(), b.data.half()) and torch.equal(a.special.half(), b.special.half())
    assert a.counts == b.counts and sum(a.counts.values()) > 0
    ema_a, ema_b = TagTable.load(memory["table_ema"]), TagTable.load(disk["table_ema"])
    assert torch.equal(ema_a.data.half(), ema_b.data.half())
    # bit for bit before storage: the trainers' rows themselves
    held_rows, held = disk_trainer.table.data.held()
    reference = Trainer(_cfg(data, path, tmp_path / "memory2"))
    for _ in range(6):
        reference.train_step()
    assert torch.equal(reference.table.data[held_rows], held)
    untouched = torch.ones(len(reference.table), dtype=torch.bool)
    untouched[held_rows] = False
    mapped = TagTable.load(path)
    rows_in_file = untouched[: len(mapped)]
    assert torch.equal(b.data[: len(mapped)][rows_in_file], mapped.data[rows_in_file].half().float())
    unused = [b.row(f"unused {i}") for i in range(200)]
    assert not bool(torch.isin(torch.tensor(unused), held_rows).any())  # never-used rows were never held
    assert _digest(path) == before  # the mapped table file is never written
    # checkpoints hold only the rows in memory, never the whole table
    checkpoint = tmp_path / "disk" / "checkpoints" / "step-0000006"
    assert (checkpoint / "table-rows.safetensors").is_file() and not (checkpoint / "table.safetensors").exists()
    assert (checkpoint / "table-rows.safetensors").stat().st_size < os.path.getsize(path)


def test_disk_run_resumes_exactly_and_refuses_a_changed_table_file(start, tmp_path):
    data, path = start
    full = Trainer(_cfg(data, path, tmp_path / "full", "training.table_device=disk")).run()
    killed = Trainer(_cfg(data, path, tmp_path / "killed", "training.table_device=disk"))
    run_until_killed(killed, 5)
    resumed = Trainer(_cfg(data, path, tmp_path / "killed", "training.table_device=disk", "output.resume=latest"))
    assert resumed.state.step == 4 and isinstance(resumed.table.data, DiskRows)
    result = resumed.run()
    for key in ("table", "table_ema"):
        a, b = TagTable.load(full[key]), TagTable.load(result[key])
        assert torch.equal(a.data, b.data) and torch.equal(a.special, b.special) and a.counts == b.counts
    lines = [[json.loads(x)["loss"] for x in open(tmp_path / run / "metrics.jsonl")] for run in ("full", "killed")]
    assert lines[0] == lines[1] and len(lines[0]) == 6

    os.utime(path, ns=(0, 0))  # the mapped file changed (as far as size and mtime tell): resume is refused
    with pytest.raises(CondvecError, match="gone or has changed"):
        Trainer(_cfg(data, path, tmp_path / "killed", "training.table_device=disk", "output.resume=latest",
                     "training.steps=8"))


def test_disk_needs_a_table_file_and_keeps_its_layout(start, tmp_path):
    data, path = start
    with pytest.raises(CondvecError, match="table.start_from"):
        Trainer(micro_config(data, tmp_path / "a", "training.table_device=disk"))
    with pytest.raises(CondvecError, match="own layout"):
        Trainer(_cfg(data, path, tmp_path / "b", "training.table_device=disk", "table.groups=single"))


def test_disk_without_a_table_file_is_refused_when_the_config_is_read(tmp_path):
    """The rule lives in the config's validation: no model is loaded and no data scanned before it fires."""
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="table_device=disk trains a table file without loading it"):
        micro_config(tmp_path / "no-data", tmp_path / "run", "training.table_device=disk")
    assert not (tmp_path / "run").exists()
