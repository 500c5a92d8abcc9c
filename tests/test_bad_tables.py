"""Bad table files: one-line errors from the API and every CLI, headers bounds-checked before any allocation."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from testkit import make_unet

from conditioner.errors import CondvecError
from conditioner.safefile import TableFileError, check_safetensors
from conditioner.table import FORMAT_VERSION, METADATA_KEY, TagTable
from unet_patch import discover

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_table() -> TagTable:
    table = TagTable.create(discover(make_unet()), tags=["red circle", "blue square", "cat"], init_std=1.0)
    table.set_value_source("cat", torch.ones(table.num_anchors, table.width))
    return table


@pytest.fixture
def good_file(tmp_path, good_table) -> Path:
    path = tmp_path / "good.safetensors"
    good_table.save(path)
    return path


def _tensors(table: TagTable) -> dict[str, torch.Tensor]:
    return {"data": table.data.clone(), "special": table.special.clone(),
            "values": torch.stack([table.values[n] for n in sorted(table.values)]).clone()}


def _write(path: Path, tensors: dict, meta) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _raw(header: dict, data: bytes = b"", claimed: int | None = None) -> bytes:
    """A safetensors file from a header dict; ``claimed`` overrides the header length field."""
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if claimed is None else claimed) + body + data


# ------------------------------------------------------------------------------------------------ check_safetensors


def test_check_safetensors_returns_the_header_of_a_good_file(good_file, good_table):
    header = check_safetensors(good_file)
    assert header["data"]["shape"] == list(good_table.data.shape) and header["data"]["dtype"] == "F32"
    assert json.loads(header["__metadata__"][METADATA_KEY])["tags"] == good_table.tags


F32_ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
HEADERS = {
    "empty file": (b"", r"shorter than the 8-byte header length"),
    "seven bytes": (b"\x01" * 7, r"shorter than the 8-byte header length"),
    "header length past the end": (_raw({"x": F32_ENTRY}, bytes(24), claimed=10_000),
                                   r"header claims 10000 bytes but only \d+ follow"),
    "header length 2**64-1": (b"\xff" * 8 + b"{}", r"header claims 18446744073709551615 bytes"),
    "not json": (struct.pack("<Q", 5) + b"hello", r"header is not JSON"),
    "not utf-8": (struct.pack("<Q", 4) + b"\xff\xfe{}", r"header is not JSON"),
    "json list": (_raw([1, 2]), r"header is a JSON list"),  # type: ignore[arg-type]
    "unknown dtype": (_raw({"x": {**F32_ENTRY, "dtype": "F33"}}, bytes(24)), r"unknown dtype 'F33'"),
    "negative dim": (_raw({"x": {**F32_ENTRY, "shape": [-2, 3]}}, bytes(24)), r"not a list of non-negative"),
    "shape larger than its bytes": (_raw({"x": {**F32_ENTRY, "shape": [2**40, 2**20]}}, bytes(24)),
                                    r"needs \d+ bytes, data_offsets give 24"),
    "offsets past the end": (_raw({"x": {**F32_ENTRY, "data_offsets": [0, 24]}}, bytes(10)),
                             r"ends at byte 24 of a 10-byte data section: truncated"),
    "reversed offsets": (_raw({"x": {**F32_ENTRY, "data_offsets": [24, 0]}}, bytes(24)), r"begin <= end"),
    "overlapping tensors": (_raw({"x": F32_ENTRY, "y": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                                 bytes(24)), r"tensors 'x' and 'y' overlap"),
    "metadata not strings": (_raw({"__metadata__": {"a": 1}}), r"__metadata__ must map names to strings"),
    "entry not an object": (_raw({"x": [1, 2]}), r"tensor 'x': header entry is not an object"),
}


@pytest.mark.parametrize("case", HEADERS, ids=list(HEADERS))
def test_check_safetensors_refuses_bad_headers_in_one_line(tmp_path, case):
    content, message = HEADERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TableFileError, match=message) as error:
        check_safetensors(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(TableFileError, match=message):  # the loader answers the same, before safetensors reads
        TagTable.load(path)


def test_header_claims_are_checked_before_any_allocation(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(_raw({"x": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}, bytes(64)))
    tracemalloc.start()
    try:
        with pytest.raises(TableFileError, match="truncated"):
            TagTable.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the 4 GiB tensor was never allocated


def test_header_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(_raw({"__metadata__": {"pad": "x" * 2000}}))
    assert "__metadata__" in check_safetensors(path)
    with pytest.raises(TableFileError, match=r"over the limit of 1000"):
        check_safetensors(path, max_header=1000)


# ---------------------------------------------------------------------------------------------------- TagTable.load


def _bad_table_cases(tmp_path: Path, good_table: TagTable, good_file: Path) -> dict[str, tuple[Path, str]]:
    meta, tensors, raw = good_table.metadata(), _tensors(good_table), good_file.read_bytes()
    cases = {}

    def case(name: str, path: Path, message: str):
        cases[name] = (path, message)

    for cut in (8, 100, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"trunc{cut}.safetensors"
        path.write_bytes(raw[:cut])
        case(f"truncated at {cut}", path, r"not a readable .safetensors table \(.*(truncated|not a safetensors)")
    path = tmp_path / "text.safetensors"
    path.write_text("tags: red circle, blue square\n", encoding="utf-8")
    case("a text file", path, r"not a readable .safetensors table")
    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    case("not a condvec file", path, r"without condvec metadata")
    case("newer format version", _write(tmp_path / "v.safetensors", tensors, meta | {"format_version": 7}),
         rf"format version 7 is not supported: it is newer .*\(version {FORMAT_VERSION}\); upgrade condvec")
    case("metadata not an object", _write(tmp_path / "list.safetensors", tensors, [meta]),
         r"metadata is not a JSON object")
    nan = _tensors(good_table)
    nan["data"][1, 0, 5] = float("nan")
    case("NaN in a tag row", _write(tmp_path / "nan.safetensors", nan, meta),
         r"data of 'blue square' holds NaN or infinite values")
    inf = _tensors(good_table)
    inf["special"][1, 0, 0] = float("-inf")
    case("inf in the padding row", _write(tmp_path / "inf.safetensors", inf, meta),
         r"special of 'padding' holds NaN or infinite values")
    split = _tensors(good_table)
    split["values"][0, 0, 0] = float("inf")
    case("inf in a value source", _write(tmp_path / "val.safetensors", split, meta),
         r"value source of 'cat' holds NaN or infinite values")
    case("more tags than rows", _write(tmp_path / "rows.safetensors", tensors, meta | {"tags": meta["tags"] + ["x"]}),
         r"table data has shape \(3, 1, \d+\), layout needs \(4, 1, \d+\)")
    case("more layers than columns", _write(tmp_path / "cols.safetensors", tensors,
                                            meta | {"group_names": meta["group_names"] + ["extra"]}),
         r"metadata contradicts the tensors .*shape")
    case("split tag without a value row", _write(tmp_path / "split.safetensors", tensors,
                                                 meta | {"split_tags": ["cat", "red circle"]}),
         r"metadata contradicts the tensors: split_tags names 2 tag\(s\), tensor 'values' has shape \(1, ")
    case("layer group out of range", _write(tmp_path / "group.safetensors", tensors,
                                            meta | {"layer_group": [0] * (len(meta["layer_group"]) - 1) + [99]}),
         r"layer group 99 does not exist")
    case("layers not a list", _write(tmp_path / "layers.safetensors", tensors, meta | {"layers": 3}),
         r"metadata field 'layers' must be a non-empty list of layer objects, got 3")
    case("missing field", _write(tmp_path / "missing.safetensors", tensors,
                                 {k: v for k, v in meta.items() if k != "mode"}), r"metadata field 'mode' is missing")
    layers = [dict(layer) for layer in meta["layers"]]
    layers[0]["cross_dim"] = float(layers[0]["cross_dim"])
    case("float cross_dim", _write(tmp_path / "fdim.safetensors", tensors, meta | {"layers": layers}),
         r"layer 0: 'cross_dim' must be an integer in \[1, 65536\]")
    case("integer tag name", _write(tmp_path / "itag.safetensors", tensors, meta | {"tags": [1, 2, 3]}),
         r"metadata field 'tags' must be a list of non-empty strings")
    case("provenance not a list", _write(tmp_path / "prov.safetensors", tensors, meta | {"provenance": "x"}),
         r"metadata field 'provenance' must be a list of objects")
    case("absurd pad_to", _write(tmp_path / "pad.safetensors", tensors, meta | {"pad_to": 10**9}),
         r"metadata field 'pad_to' must be null or an integer in \[1, 1024\]")
    case("zero anchors", _write(tmp_path / "anch.safetensors", tensors, meta | {"anchors": []}),
         r"metadata field 'anchors' must be a non-empty list of finite numbers")
    case("bool use_sink as string", _write(tmp_path / "sink.safetensors", tensors, meta | {"use_sink": "no"}),
         r"metadata field 'use_sink' must be true or false")
    case("multi-vector tag without its rows", _write(tmp_path / "mv.safetensors", tensors,
                                                     meta | {"vectors": {"cat": 2}}),
         r"multi-vector tag 'cat' lacks its row\(s\) 'cat#2'")
    f8 = {k: (v.to(torch.float8_e4m3fn) if k == "data" else v) for k, v in _tensors(good_table).items()}
    case("F8 data", _write(tmp_path / "f8.safetensors", f8, meta),
         r"tensor 'data' is stored as F8_E4M3; a table stores F32, F16, BF16")
    return cases


def test_every_bad_table_is_a_one_line_table_file_error(tmp_path, good_table, good_file):
    assert TagTable.load(good_file).tags == good_table.tags
    for name, (path, message) in _bad_table_cases(tmp_path, good_table, good_file).items():
        with pytest.raises(TableFileError, match=message) as error:
            TagTable.load(path)
        text = str(error.value)
        assert "\n" not in text and path.name in text, (name, text)
        assert isinstance(error.value, CondvecError)


# ---------------------------------------------------------------------------------------------------- CLIs


def _run_main(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _assert_one_line_exit_2(main, argv, capsys, path: Path, prog: str):
    code = _run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: ") and path.name in err, err
    assert "Traceback" not in err


@pytest.fixture
def bad_files(tmp_path, good_table, good_file) -> list[Path]:
    cases = _bad_table_cases(tmp_path, good_table, good_file)
    chosen = ("truncated at 100", "not a condvec file", "newer format version", "NaN in a tag row",
              "more tags than rows")
    return [cases[name][0] for name in chosen]


def test_condvec_merge_answers_a_bad_table_in_one_line(bad_files, tmp_path, capsys):
    from merge.cli import main

    for path in bad_files:
        _assert_one_line_exit_2(main, ["list", str(path)], capsys, path, "condvec-merge")
        _assert_one_line_exit_2(main, ["drop", str(path), "cat", "-o", str(tmp_path / "out.safetensors")], capsys,
                                path, "condvec-merge")
        assert not (tmp_path / "out.safetensors").exists()


def test_condvec_generate_answers_a_bad_table_in_one_line(bad_files, tmp_path, capsys):
    from unet_patch.cli import main

    for path in bad_files:
        _assert_one_line_exit_2(main, ["--model", str(REPO / "models" / "tiny-base"), "--table", str(path),
                                       "--prompt", "red circle", "--steps", "1", "--out", str(tmp_path / "o.png")],
                                capsys, path, "condvec-generate")
        assert not (tmp_path / "o.png").exists()


def test_condvec_train_answers_a_bad_start_table_in_one_line(bad_files, tmp_path, capsys):
    from demo.data import generate_demo_dataset
    from train.cli import main

    generate_demo_dataset(tmp_path / "data", 4)
    empty = tmp_path / "run.yaml"
    empty.write_text("{}\n", encoding="utf-8")
    for path in bad_files[:2]:
        _assert_one_line_exit_2(main, [str(empty), f"data.path={tmp_path / 'data'}", "model.builtin=micro",
                                       "data.resolution=16", "training.steps=1", f"table.start_from={path}",
                                       f"output.dir={tmp_path / 'out'}", "output.progress=false"],
                                capsys, path, "condvec-train")
