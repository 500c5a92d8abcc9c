"""Invariant 7 on a real process: SIGKILL ``condvec-train`` at random moments, during saves too, resume each time,
and the final tables equal an uninterrupted run's, bit for bit on CPU — with the table in memory, and with it on disk
(``training.table_device: disk``: checkpoints hold the touched rows, the final table is streamed out)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train.checkpoint as ckpt
from demo.data import generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
TIMEOUT = 240  # seconds for any one process: far above the few seconds a segment takes


def _overrides(data: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    return [*extra,
        "model.builtin=micro", f"data.path={data}", "data.resolution=16", "data.bucketing=false",
        "data.caption_dropout=0.2", "data.flip=true", f"training.steps={STEPS}", "training.batch_size=4",
        "training.lr=0.05", "training.lr_schedule=cosine", "training.warmup_steps=3", "training.ema_decay=0.9",
        f"output.dir={out}", "output.save_every=2", "output.keep_last=2", "output.sample_every=0",
        "output.progress=false",
    ]


def _start(config: Path, data: Path, out: Path, log: Path, resume: bool,
           extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m train.cli`` in its own process, as a user runs ``condvec-train``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "train.cli", str(config), *_overrides(data, out, extra)]
    cmd += ["output.resume=latest"] if resume else []
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _temps(folder: Path) -> list[str]:
    """Every temporary or half-replaced entry under ``folder`` (atomic writes' ``.tmp-``, re-saves' ``.prev``)."""
    found = [p for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".prev")]
    return sorted(str(p.relative_to(folder)) for p in found)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, out: Path, trigger: tuple, rng: random.Random) -> bool:
    """Wait for ``trigger``, then SIGKILL ``proc``; returns False when the run finished first.

    Triggers: ``("delay", s)`` s seconds after the start (imports and set-up included); ``("step", n)`` once
    ``metrics.jsonl`` holds n steps, plus a random 0–0.2 s; ``("save",)`` the moment a checkpoint's temporary folder
    appears beside a complete checkpoint; ``("export",)`` the moment the final table's temporary file appears in the
    run folder.
    """
    kind, deadline = trigger[0], time.monotonic() + TIMEOUT
    checkpoints = out / "checkpoints"
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"condvec-train did not reach {trigger} in {TIMEOUT} s")
        if kind == "delay":
            time.sleep(trigger[1])
            break
        if kind == "step" and _lines(out / "metrics.jsonl") >= trigger[1]:
            time.sleep(rng.uniform(0.0, 0.2))
            break
        names = os.listdir(checkpoints) if kind == "save" and checkpoints.is_dir() else []
        if any(".tmp-" in n for n in names) and any(".tmp-" not in n for n in names):  # a save, and a checkpoint
            break
        if kind == "export" and out.is_dir() and any(n.startswith(".tmp-table") for n in os.listdir(out)):
            break
        time.sleep(0.0002 if kind in ("save", "export") else 0.01)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_file_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb), (a.name, sorted(ta), sorted(tb))
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{a.name}: tensor {key!r} differs"


def _disk_table(tmp_path: Path, data: Path) -> tuple[str, ...]:
    """A start table file for a disk run (a 2-step micro run's table, fp16), and the overrides that train it."""
    from testkit import micro_config

    from conditioner import TagTable
    from train.loop import Trainer

    first = Trainer(micro_config(data, tmp_path / "first", steps=2)).run()
    path = tmp_path / "start.safetensors"
    TagTable.load(first["table"]).save(path, dtype="fp16")
    return (f"table.start_from={path}", "training.table_device=disk")


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, where):
    data, config = tmp_path / "data", tmp_path / "run.yaml"
    generate_demo_dataset(data, 16, size=32, seed=5)
    config.write_text("{}\n")
    extra = _disk_table(tmp_path, data) if where == "disk" else ()
    reference_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = _start(config, data, reference_out, tmp_path / "reference.log", False, extra)  # runs alongside

    rng = random.Random(11)
    # the first kill may land in the imports or before the first checkpoint; "save" is retried until one kill lands
    # while a checkpoint is half written (its temporary folder still there after the kill)
    plan = [("delay", rng.uniform(0.5, 4.0)), ("save",), ("step", rng.randint(10, 16)), ("export",)]
    kills, during_save, starts, log = [], 0, 0, ""
    while True:
        trigger = plan.pop(0) if plan else None
        resume = bool(ckpt.list_checkpoints(str(out)))  # killed before the first checkpoint: start afresh
        log = tmp_path / f"segment-{starts}.log"
        proc = _start(config, data, out, log, resume, extra)
        starts += 1
        if trigger is None:
            assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-2000:]
            break
        if not _kill_when(proc, out, trigger, rng):
            assert proc.returncode == 0, log.read_text()[-2000:]
            if trigger[0] != "export":
                raise AssertionError(f"the run finished before {trigger}; {kills} kills so far")
            break  # the last kill came too late: the run is complete
        half_written = bool(out.joinpath("checkpoints").is_dir()
                            and any(".tmp-" in n for n in os.listdir(out / "checkpoints")))
        during_save += trigger[0] == "save" and half_written
        if trigger[0] == "save":  # the checkpoint that existed when the save began (or a newer one) survived
            assert ckpt.list_checkpoints(str(out)), f"a kill during a save left no checkpoint: {os.listdir(out)}"
        kills.append((trigger, half_written))
        if trigger[0] == "save" and not half_written and len(kills) < 10:  # the save ended before the kill: again
            plan.insert(0, ("save",))
        # whatever the moment, every checkpoint that list_checkpoints offers is complete and loads
        for path in ckpt.list_checkpoints(str(out)):
            ckpt.load_checkpoint(path)

    assert reference.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    assert len(kills) >= 3, kills
    assert during_save >= 1, f"no kill landed inside a checkpoint save: {kills}"
    resumed = [n for n in range(1, starts) if "resumed from " in (tmp_path / f"segment-{n}.log").read_text()]
    assert len(resumed) >= 2, f"only segments {resumed} resumed a checkpoint; kills: {kills}"

    for name in ("table.safetensors", "table-ema.safetensors"):
        _same_file_tensors(reference_out / name, out / name)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference_steps = [json.loads(line) for line in (reference_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in steps] == [m["loss"] for m in reference_steps]

    assert _temps(out / "checkpoints") == [], f"left behind after {kills}"
    entries = sorted(os.listdir(out / "checkpoints"))
    found = ckpt.list_checkpoints(str(out))
    assert [os.path.join(out, "checkpoints", n) for n in entries] == found, entries  # nothing but checkpoints
    assert len(found) == 2 and found[-1].endswith(f"step-{STEPS:07d}")
    for path in found:
        table, tensors, info = ckpt.load_checkpoint(path)
        assert info["step"] == int(path[-7:]) and len(table) > 0 and tensors
    _same_file_tensors(reference_out / "checkpoints" / f"step-{STEPS:07d}" / "state.safetensors",
                       Path(found[-1]) / "state.safetensors")
    assert _temps(out) == []  # a resumed run clears what killed writes left behind
