"""Nothing the user had is lost: no command writes a table that cannot be loaded again, refused commands leave
every pre-existing file's bytes and mode as they were, and one run owns one output folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import make_unet, micro_run

from conditioner import TagTable
from conditioner.errors import CondvecError
from conditioner.safefile import TableFileError
from conditioner.table import METADATA_KEY
from demo.data import generate_demo_dataset
from merge.cli import main as merge_main
from train.config import ConfigError, load_config
from train.runlock import LOCK_NAME, RunFolderError, acquire, release
from unet_patch import table_for_unet

REPO = Path(__file__).resolve().parents[1]


def _table(tags=("cat", "dog", "glass")) -> TagTable:
    table = table_for_unet(make_unet(), tags=list(tags), anchors=2, init_std=1.0, seed=0, base_name="tiny")
    table.add_tags(["mv"], init="normal", std=1.0, vectors=3)
    return table


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------------------- the save gate


@pytest.mark.parametrize("poison", ["data", "special", "values", "inf"])
def test_save_refuses_non_finite_values_and_leaves_the_file_alone(tmp_path, poison):
    """`TagTable.save` checks everything `load` checks before it touches the destination."""
    path = tmp_path / "t.safetensors"
    table = _table()
    table.save(path)
    before = _snapshot(path)
    if poison == "values":
        table.set_value_source("cat", torch.full((table.num_anchors, table.width), float("nan")))
    elif poison == "inf":
        table.data[0, 0, 0] = float("inf")
    else:
        getattr(table, poison)[1, 0, 3] = float("nan")
    with pytest.raises(TableFileError, match="NaN or infinite values: refusing to write"):
        table.save(path)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"], "no temporary file left behind"


def test_save_refuses_a_broken_multi_vector_tag(tmp_path):
    table = _table()
    table.vectors["cat"] = 2  # claims a row cat#2 that does not exist
    with pytest.raises(CondvecError, match=r"multi-vector tag 'cat' lacks its row\(s\) 'cat#2'"):
        table.save(tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


# ------------------------------------------------------------------------- edits closed over the invariants


def test_multi_vector_tags_move_as_a_unit(tmp_path, capsys):
    """Drop / rename / extract of one row of a multi-vector tag is refused; of the owner, every row moves."""
    path = tmp_path / "t.safetensors"
    _table().save(path)
    before = _snapshot(path)
    for argv in (["drop", path, "mv#2", "--in-place"], ["rename", path, "mv#3", "x", "--in-place"],
                 ["extract", path, "mv#2", "-o", tmp_path / "x.safetensors"]):
        assert merge_main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "is one vector of the multi-vector tag 'mv' (3 vectors)" in err and err.count("\n") == 1, err
    assert _snapshot(path) == before and not (tmp_path / "x.safetensors").exists()

    assert merge_main(["extract", str(path), "mv", "-o", str(tmp_path / "mv.safetensors")]) == 0
    assert TagTable.load(tmp_path / "mv.safetensors").tags == ["mv", "mv#2", "mv#3"]
    assert merge_main(["rename", str(path), "mv", "many", "-o", str(tmp_path / "r.safetensors")]) == 0
    renamed = TagTable.load(tmp_path / "r.safetensors")
    assert renamed.vectors == {"many": 3} and "many#3" in renamed.tags and "mv" not in renamed.tags
    assert merge_main(["drop", str(path), "--match", "^mv", "-o", str(tmp_path / "d.safetensors")]) == 0
    assert TagTable.load(tmp_path / "d.safetensors").tags == ["cat", "dog", "glass"]


_OPS = st.sampled_from([
    ["blend", "{t}", "new", "{c}*cat + 0.5*dog"],
    ["blend", "{t}", "new", "{c}*mv"],
    ["swap", "{t}", "new", "--key", "cat", "--value", "glass"],
    ["drop", "{t}", "{name}"],
    ["rename", "{t}", "{name}", "renamed"],
    ["extract", "{t}", "{name}"],
])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_OPS, coefficient=st.sampled_from(["0.5", "1e39", "-1e39", "3e38", "1e-30", "nan", "inf"]),
       name=st.sampled_from(["cat", "mv", "mv#2", "mv#3", "dog"]), in_place=st.booleans(),
       mode=st.sampled_from([0o600, 0o644]))
def test_no_merge_command_writes_a_table_load_refuses(tmp_path, capsys, op, coefficient, name, in_place, mode):
    """Whatever the edit: exit 0 and the written table loads, or exit 2 in one line and every file is unchanged."""
    folder = tmp_path / f"case-{os.urandom(4).hex()}"
    folder.mkdir()
    path = folder / "t.safetensors"
    _table().save(path)
    os.chmod(path, mode)
    before = _snapshot(path)
    argv = [a.format(t=path, c=coefficient, name=name) for a in op]
    out = folder / "out.safetensors"
    argv += ["--in-place"] if in_place and op[0] not in ("extract", "swap") else ["-o", str(out)]
    code = merge_main(argv)
    err = capsys.readouterr().err
    written = path if "--in-place" in argv else out
    if code == 0:
        TagTable.load(written)  # must not raise
        if written == path:
            assert stat.S_IMODE(path.stat().st_mode) == mode, "--in-place keeps the file's permissions"
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert _snapshot(path) == before and not out.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_in_place_edits_a_symlinks_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "store" / "real.safetensors"
    real.parent.mkdir()
    _table().save(real)
    os.chmod(real, 0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert merge_main(["drop", str(link), "dog", "--in-place"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert "dog" not in TagTable.load(real).tags and stat.S_IMODE(real.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------------ metadata the loader trusts


_BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                        st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2))
_FIELDS = ["mode", "group_kind", "group_names", "layer_group", "anchors", "tags", "split_tags", "use_sink", "pad_to",
           "normalization", "base_model", "counts", "provenance", "negative_zeros", "vectors", "layers"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_BAD_VALUES)
def test_any_metadata_value_loads_cleanly_or_is_one_table_file_error(tmp_path, field, value):
    """A table whose metadata field holds anything at all: one TableFileError line, or a table that works."""
    from safetensors.torch import save_file

    from conditioner.encode import encode

    table = _table()
    meta = table.metadata() | {field: value}
    path = tmp_path / "bad.safetensors"
    tensors = {"data": table.data, "special": table.special}
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})
    try:
        loaded = TagTable.load(path)
    except TableFileError as err:
        assert "\n" not in str(err)
        return
    repr(loaded)
    encode(loaded, [", ".join(t for t in loaded.tags[:3] if "#" not in t) or ""], timesteps=torch.tensor([10.0]))


# --------------------------------------------------------------------------------------------- config numbers


@pytest.mark.parametrize("override, message", [
    ("training.lr=nan", "'training.lr' must be a finite number"),
    ("training.lr=1e39", "'training.lr' must be a finite number|'training.lr' must be <= 10"),
    ("training.lr=1000", "'training.lr' must be <= 10"),
    ("table.init_std=1e39", "'table.init_std' must be a finite number|'table.init_std' must be <= 10"),
    ("table.init_std=-1", "'table.init_std' must be >= 0"),
    ("training.lr_unet=inf", "'training.lr_unet' must be a finite number"),
    ("table.pad_to=1000000000", r"'table.pad_to' must be null or a whole number in \[1, 1024\]"),
    ("table.tokens_per_tag=100000", r"'table.tokens_per_tag' must be a whole number in \[1, 1024\]"),
    ("output.sample_upscale=100000", "'output.sample_upscale' must be <= 16"),
    ("data.on_bad_image=ignore", "'data.on_bad_image' must be one of"),
])
def test_config_numbers_are_finite_and_bounded(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.path=x", "model.builtin=micro", override])


def test_every_schema_key_is_read_by_the_code():
    """A documented key that no code reads does nothing: every ``section.key`` is read as ``.key`` somewhere."""
    from train.config import schema_help

    sources = "\n".join(p.read_text(encoding="utf-8") for pkg in ("train", "unet_patch", "conditioner", "bootstrap")
                        for p in (REPO / pkg).rglob("*.py") if p != REPO / "train" / "config.py")
    unread = [key for key, _, _ in schema_help()
              if not any(pattern.format(key.split(".")[-1]) in sources for pattern in (".{}", '"{}"', "'{}'"))]
    assert not unread, f"schema keys no code reads: {unread}"


# ----------------------------------------------------------------------------------------- checkpoints and runs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(path, 24, size=32, seed=3)
    return path


def _args(demo_dir, out, *extra) -> list[str]:
    return micro_run(demo_dir, out, *extra, steps=2, save_every=1)


def test_a_corrupt_checkpoint_is_refused_and_the_runs_table_survives(demo_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from train.loop import Trainer

    run = tmp_path / "run"
    Trainer(load_config(None, _args(demo_dir, run))).run()
    table_before = _snapshot(run / "table.safetensors")
    (latest,) = sorted((run / "checkpoints").iterdir())[-1:]
    state = load_file(latest / "state.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, latest / "state.safetensors")
    with pytest.raises(CondvecError, match=rf"checkpoint file .*state.safetensors.* is damaged: {key} holds NaN"):
        Trainer(load_config(None, _args(demo_dir, run, "training.steps=4", "output.resume=latest")))
    assert _snapshot(run / "table.safetensors") == table_before


def test_a_finished_run_without_checkpoints_is_not_overwritten(demo_dir, tmp_path):
    from train.loop import Trainer

    run = tmp_path / "run"
    (run).mkdir()
    (run / "table.safetensors").write_bytes(b"the user's finished run")
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match=r"already holds a run \(table.safetensors, metrics.jsonl\)"):
        Trainer(load_config(None, _args(demo_dir, run)))
    assert (run / "table.safetensors").read_bytes() == b"the user's finished run"
    Trainer(load_config(None, _args(demo_dir, run, "output.overwrite=true"))).run()
    TagTable.load(run / "table.safetensors")


def test_lock_is_exclusive_reentrant_and_stale_locks_are_taken_over(tmp_path):
    path = acquire(str(tmp_path))
    assert acquire(str(tmp_path)) == path  # the same process may take it again
    release(path)
    assert not os.path.exists(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    Path(path).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert acquire(str(tmp_path)) == path and json.loads(Path(path).read_text())["pid"] == os.getpid()
    release(path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Path(path).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(RunFolderError, match=rf"in use by another condvec-train \(pid {sleeper.pid}\)"):
            acquire(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_processes_on_one_output_dir_exactly_one_runs(demo_dir, tmp_path, empty_yaml_path):
    """Two condvec-train started together on one folder: one trains, the other is refused in one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.cli", empty_yaml_path, *_args(demo_dir, run, "training.steps=20")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    last = refused.strip().splitlines()[-1]
    assert "condvec-train: error: output.dir" in last and ("in use by another condvec-train (pid" in last
                                                            or "already holds a run" in last), refused
    assert not (run / LOCK_NAME).exists(), "the lock goes with the process"
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 21)), "one run's metrics, not two"


@pytest.fixture
def empty_yaml_path(tmp_path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    return str(path)


def test_a_fifo_in_the_dataset_is_skipped(demo_dir, tmp_path):
    from train.data import scan_dataset

    data = tmp_path / "data"
    generate_demo_dataset(data, 4, size=32, seed=1)
    os.mkfifo(data / "x.png")
    items = scan_dataset(data)  # would block forever on the FIFO
    assert len(items) == 4


def test_on_bad_image_error_is_honoured(demo_dir, tmp_path):
    from train.loop import Trainer

    data = tmp_path / "data"
    generate_demo_dataset(data, 4, size=32, seed=1)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("red circle\n")
    with pytest.raises(CondvecError, match=r"image broken.png in .*set on_bad_image='skip'"):
        Trainer(load_config(None, _args(data, tmp_path / "run", "data.on_bad_image=error")))
