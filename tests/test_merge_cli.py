import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit import make_unet

from conditioner import TagTable
from merge import blend, combine, drop, extract, mix, rename, swap
from merge.cli import main
from unet_patch import table_for_unet

TAGS = ["cat", "dog", "elephant", "glass"]


def _make(path: Path, mode: str = "vector", tags=TAGS, seed: int = 0) -> TagTable:
    table = table_for_unet(make_unet(), tags=list(tags), mode=mode, anchors=2, init_std=1.0, seed=seed,
                           base_name="tiny")
    table.counts = {name: 10 * (i + 1) for i, name in enumerate(table.tags)}
    table.save(path)
    return table


@pytest.fixture
def table_file(tmp_path) -> Path:
    path = tmp_path / "table.safetensors"
    _make(path)
    return path


def _run_ok(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _equal_tables(a: TagTable, b: TagTable) -> bool:
    return (a.tags == b.tags and torch.equal(a.data, b.data) and torch.equal(a.special, b.special)
            and a.values.keys() == b.values.keys() and all(torch.equal(a.values[k], b.values[k]) for k in a.values)
            and a.counts == b.counts)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- list
def test_list_prints_a_table_summary_and_one_line_per_tag(table_file, capsys):
    out = _run_ok(["list", table_file], capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{table_file}: 4 tags (0 split), vector mode, 7 groups (layers), 7 layers, 2 anchors")
    assert "tiny (layout " in lines[0] and lines[0].endswith("KiB")
    assert lines[1].split()[:3] == ["tag", "count", "split"]
    assert [line.split()[:3] for line in lines[2:]] == [["cat", "10", "no"], ["dog", "20", "no"],
                                                        ["elephant", "30", "no"], ["glass", "40", "no"]]


def test_list_json_has_counts_split_flags_and_per_group_norms(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    table = swap(_make(path), "split", key="cat", value="dog", layers="mid")
    table.save(path)
    summary = json.loads(_run_ok(["list", path, "--json"], capsys))
    assert summary["mode"] == "vector" and summary["num_tags"] == 5 and summary["split_tags"] == 1
    assert summary["anchors"] == [0.0, 999.0] and summary["base_model"]["name"] == "tiny"
    assert summary["file_bytes"] == path.stat().st_size
    by_name = {tag["name"]: tag for tag in summary["tags"]}
    assert by_name["dog"]["count"] == 20 and by_name["split"]["count"] == 0
    assert by_name["split"]["split"] and not by_name["cat"]["split"]
    cat = table.data[table.row("cat")]
    expected = [float(cat[:, table.group_columns(g)].norm(dim=-1).mean()) for g in range(7)]
    assert by_name["cat"]["norms"] == pytest.approx(expected, abs=1e-5)
    assert len(by_name["split"]["value_norms"]) == 7


# ----------------------------------------------------------------------------- editing commands
EDITS = [
    (["blend", "new", "0.6*cat + 0.4*dog", "--layers", "up.*"],
     lambda t: blend(t, "new", "0.6*cat + 0.4*dog", layers="up.*"), "blend 'new' = 0.6*cat + 0.4*dog in up.*"),
    (["blend", "new", "0.5*cat + 0.5*dog", "--slerp"],
     lambda t: blend(t, "new", "0.5*cat + 0.5*dog", slerp=True), "slerp 'new'"),
    (["swap", "new", "--key", "elephant", "--value", "glass", "--layers", "down.*", "--rest", "value"],
     lambda t: swap(t, "new", key="elephant", value="glass", layers="down.*", rest="value"),
     "swap 'new' = key 'elephant', value 'glass' in down.*, rest=value"),
    (["swap", "new", "--key", "elephant", "--value", "glass"],
     lambda t: swap(t, "new", key="elephant", value="glass"), "swap 'new'"),
    (["mix", "new", "--a", "cat", "--b", "dog", "--layers", "0-2"],
     lambda t: mix(t, "new", a="cat", b="dog", layers="0-2"), "mix 'new' = 'cat' in 0-2, 'dog' elsewhere"),
    (["drop", "cat", "--match", "^gl"], lambda t: drop(t, ["cat"], match="^gl"), "dropped 2 tags"),
    (["rename", "cat", "Kitten"], lambda t: rename(t, "cat", "Kitten"), "renamed 'cat' to 'kitten'"),
    (["extract", "dog", "cat"], lambda t: extract(t, ["dog", "cat"]), "extracted 'cat', 'dog'"),
]


@pytest.mark.parametrize("argv, api, summary", EDITS, ids=[e[0][0] + str(i) for i, e in enumerate(EDITS)])
def test_edit_commands_write_what_the_python_api_returns(tmp_path, table_file, capsys, argv, api, summary):
    before = table_file.read_bytes()
    out_path = tmp_path / "out.safetensors"
    printed = _run_ok([argv[0], table_file, *argv[1:], "-o", out_path], capsys)
    assert printed.count("\n") == 1 and printed.startswith(f"wrote {out_path}: {summary}")
    written = TagTable.load(out_path)
    expected = api(TagTable.load(table_file))
    assert _equal_tables(written, expected)
    assert written.provenance == expected.provenance
    assert table_file.read_bytes() == before  # -o never touches TABLE


def test_in_place_rewrites_table(table_file, capsys):
    original = TagTable.load(table_file)
    _run_ok(["swap", table_file, "new", "--key", "cat", "--value", "dog", "--layers", "mid", "--in-place"], capsys)
    assert _equal_tables(TagTable.load(table_file), swap(original, "new", key="cat", value="dog", layers="mid"))


def test_force_overwrites_an_existing_output_and_replaces_an_existing_tag(tmp_path, table_file, capsys):
    out_path = tmp_path / "out.safetensors"
    out_path.write_bytes(b"old")
    original = TagTable.load(table_file)
    _run_ok(["blend", table_file, "dog", "0.5*cat + 0.5*dog", "-o", out_path, "--force"], capsys)
    assert _equal_tables(TagTable.load(out_path), blend(original, "dog", "0.5*cat + 0.5*dog", overwrite=True))


@pytest.mark.parametrize("mode", ["error", "left", "right", "mean"])
def test_combine_command(tmp_path, capsys, mode):
    left_path, right_path, out_path = (tmp_path / f"{n}.safetensors" for n in ("left", "right", "out"))
    left = _make(left_path, tags=["cat", "dog"])
    right = _make(right_path, tags=["bird", "dog"], seed=3)
    right.special = left.special.clone()
    right.save(right_path)
    argv = ["combine", left_path, right_path, "-o", out_path, "--on-conflict", mode]
    if mode == "error":
        assert main([str(a) for a in argv]) == 2
        assert "conflicts: 1 tag with different vectors in both tables: 'dog'" in capsys.readouterr().err
        assert not out_path.exists()
        return
    printed = _run_ok(argv, capsys)
    assert printed.startswith(f"wrote {out_path}: combined, 1 tags added from {right_path}, 1 conflicts resolved")
    written = TagTable.load(out_path)
    assert _equal_tables(written, combine(left, right, on_conflict=mode))
    assert written.provenance[-1]["files"] == ["left.safetensors", "right.safetensors"]


# ----------------------------------------------------------------------------- errors
def _other_base(tmp_path):
    _make(tmp_path / "kv.safetensors", mode="kv")


def _corrupt(tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")


def _existing_out(tmp_path):
    (tmp_path / "out.safetensors").write_bytes(b"precious")


ERRORS = [
    (["blend", "T", "new", "0.5*cat + 0.5*dgo", "-o", "O"], None, "unknown tag 'dgo' (did you mean 'dog'?)"),
    (["swap", "T", "new", "--key", "elefant", "--value", "dog", "--in-place"], None,
     "unknown tag 'elefant' (did you mean 'elephant'?)"),
    (["combine", "T", "kv.safetensors", "-o", "O"], _other_base,
     "not built for the same base and layout: mode vector vs kv"),
    (["blend", "T", "new", "0.5*", "-o", "O"], None, "term '0.5*' must be WEIGHT*TAG"),
    (["blend", "T", "new", "0.6*cat-0.4*dog", "--in-place"], None, "more than one '*'"),
    (["swap", "T", "new", "--key", "cat", "--value", "dog", "--layers", "nope", "-o", "O"], None,
     "layer spec item 'nope' matches no group or layer; groups: 0 down.0.0"),
    (["mix", "T", "new", "--a", "cat", "--b", "dog", "--layers", "99", "-o", "O"], None,
     "group index 99 is out of range"),
    (["blend", "T", "dog", "0.5*cat + 0.5*glass", "-o", "O"], None, "tag 'dog' already exists"),
    (["rename", "T", "cat", "dog", "--in-place"], None, "tag 'dog' already exists"),
    (["blend", "T", "new", "cat", "-o", "out.safetensors"], _existing_out,
     "output 'out.safetensors' already exists; pass --force to overwrite it"),
    (["list", "missing.safetensors"], None, "table file 'missing.safetensors' does not exist"),
    (["drop", "corrupt.safetensors", "cat", "--in-place"], _corrupt, "is not a readable .safetensors table"),
    (["blend", "T", "new", "cat"], None, "say where to write: -o OUT.safetensors, or --in-place"),
    (["blend", "T", "new", "cat", "-o", "O", "--in-place"], None, "give either -o OUT or --in-place, not both"),
    (["swap", "T", "new", "--key", "cat", "--value", "dog", "--rest", "value", "-o", "O"], None,
     "--rest says what NEW is outside --layers"),
    (["swap", "T", "new", "--value", "dog", "-o", "O"], None, "swap: the following arguments are required: --key"),
    (["combine", "T", "T", "-o", "O", "--on-conflict", "max"], None, "argument --on-conflict: invalid choice"),
    (["drop", "T", "--in-place"], None, "nothing to drop"),
    (["drop", "T", "--match", "^zzz", "--in-place"], None, "match pattern '^zzz' matches no tag"),
    (["frobnicate", "T"], None, "invalid choice: 'frobnicate'"),
    (["extract", "T", "cat"], None, "extract: the following arguments are required: -o/--output"),
]


@pytest.mark.parametrize("argv, setup, message", ERRORS, ids=[f"{e[0][0]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, setup, message):
    monkeypatch.chdir(tmp_path)
    _make(tmp_path / "table.safetensors")
    if setup:
        setup(tmp_path)
    before = _files(tmp_path)
    argv = [{"T": "table.safetensors", "O": "new.safetensors"}.get(a, a) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("condvec-merge: error: ")
    assert message in captured.err
    assert _files(tmp_path) == before  # nothing written, nothing overwritten


def test_console_script_error_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "table.safetensors"
    _make(path)
    script = Path(sys.executable).parent / "condvec-merge"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "merge.cli"]
    result = subprocess.run([*command, "blend", str(path), "new", "0.5*cat + 0.5*dgo", "-o", str(tmp_path / "o")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "condvec-merge: error: unknown tag 'dgo' (did you mean 'dog'?); the table has 4 tags"
    ]
    assert not (tmp_path / "o").exists()
