import json

import pytest
import torch
from safetensors.torch import save_file
from testkit import make_unet

from conditioner import TagNormalization, TagTable, encode, tokenize
from conditioner.errors import CondvecError
from unet_patch import discover, table_for_unet


@pytest.fixture(scope="module")
def layers():
    return discover(make_unet())


def _assert_tables_equal(a: TagTable, b: TagTable):
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.special, b.special)
    assert sorted(a.values) == sorted(b.values)
    for name in a.values:
        assert torch.equal(a.values[name], b.values[name])
    assert a.metadata() == b.metadata()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="vector", groups="single"),
        dict(mode="vector", groups="blocks", anchors=3, pad_to=77),
        dict(mode="vector", groups="layers", anchors=[0.0, 500.0, 999.0], use_sink=False),
        dict(mode="kv", anchors=2),
        dict(mode="vector", groups={"down": ["down.*"], "rest": ["mid.*", "up.*"]},
             normalization=TagNormalization(lowercase=False, underscores="keep")),
    ],
)
def test_save_load_roundtrip_is_exact(tmp_path, layers, kwargs):
    """Invariant 6: every tensor and every metadata field survives save → load."""
    table = TagTable.create(layers, tags=["Red_Circle", "blue square", "mascot"], init_std=0.3,
                            base_model={"name": "tiny", "path": "/x"}, **kwargs)
    table.counts = {table.tags[0]: 12, table.tags[1]: 3}
    table.provenance = [{"op": "test", "inputs": ["a"]}]
    if table.mode == "vector":
        table.set_value_source(table.tags[2], torch.randn(table.num_anchors, table.width))
    path = tmp_path / "t.safetensors"
    table.save(path)
    loaded = TagTable.load(path)
    _assert_tables_equal(table, loaded)
    assert loaded.layers == table.layers
    assert loaded.normalization == table.normalization
    assert not list(tmp_path.glob(".tmp-*")), "atomic save left a temp file"


def test_groups_resolve(layers):
    assert TagTable.create(layers, groups="single").group_names == ["all"]
    blocks = TagTable.create(layers, groups="blocks")
    assert blocks.group_names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2"]
    assert TagTable.create(layers, groups="layers").width == 7 * 16
    kv = TagTable.create(layers, mode="kv")
    assert kv.width == sum(2 * layer.inner_dim for layer in layers)
    custom = TagTable.create(layers, groups={"a": ["IN01", "IN03"], "b": ["M00", "up.*"]})
    assert custom.layer_group == [0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"a": ["down.*"]}, "leave layers unassigned: mid.0"),
        ({"a": ["nothing*"], "b": ["*"]}, "pattern 'nothing\\*' matches no layer"),
        ({"a": ["down.*"], "b": ["down.0.0", "mid.*", "up.*"]}, "is in both group"),
        ("per-block", "groups must be"),
    ],
)
def test_group_errors(layers, groups, message):
    with pytest.raises(CondvecError, match=message):
        TagTable.create(layers, groups=groups)


def test_add_remove_rename(layers):
    table = TagTable.create(layers, tags=["a", "b", "c"], init_std=1.0)
    b_row = table.data[1].clone()
    table.add_tags(["d"], init="tag:b")
    assert torch.equal(table.data[table.row("d")], b_row)
    table.set_value_source("c", torch.ones(1, table.width))
    table.counts["c"] = 5
    table.rename_tag("c", "C_new")
    assert "c new" in table and "c" not in table and table.is_split("c new") and table.counts["c new"] == 5
    table.remove_tags(["a", "c new"])
    assert table.tags == ["b", "d"] and not table.values and "c new" not in table.counts
    assert torch.equal(table.data[0], b_row)
    with pytest.raises(CondvecError, match="already in the table"):
        table.add_tags(["b"])
    with pytest.raises(KeyError, match="did you mean 'b'"):
        table.row("bb")


def test_unknown_tags_error_and_lenient(layers):
    table = TagTable.create(layers, tags=["red circle", "blue square"])
    with pytest.raises(CondvecError, match=r"2 unknown tags: 'red circel' \(did you mean 'red circle'\?\), 'zzz'"):
        encode(table, ["red circel, zzz, blue square"])
    with pytest.warns(UserWarning, match="skipping unknown tag"):
        out = encode(table, ["red circel, blue square"], lenient=True)
    assert out.shape[1] == 2  # sink + blue square


def test_no_tag_limit_and_padding(layers):
    tags = [f"t{i}" for i in range(200)]
    table = TagTable.create(layers, tags=tags, groups="single", pad_to=77)
    long = encode(table, [", ".join(tags)])
    assert long.shape == (1, 201, 16)
    short = encode(table, ["t1, t2", ""])
    assert short.shape == (2, 77, 16), "fixed length, no bias channel when nothing is masked or weighted"
    assert torch.equal(short[1, 1], table.special[1, 0]) and torch.equal(short[1, 0], table.special[0, 0])
    dyn = tokenize(table, ["t1, t2", ""], pad_to=None)
    assert dyn.masked.tolist() == [[False, False, False], [False, True, True]]


def test_timestep_anchor_interpolation_by_hand(layers):
    table = TagTable.create(layers, tags=["a"], anchors=2, init_std=1.0, groups="single")
    v0, v1 = table.data[0, 0], table.data[0, 1]
    t = torch.tensor([0.0, 333.0, 999.0, 2000.0])
    out = encode(table, ["a"] * 4, timesteps=t)
    frac = 333.0 / 999.0
    expected = torch.stack([v0, (1 - frac) * v0 + frac * v1, v1, v1])
    torch.testing.assert_close(out[:, 1], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(CondvecError, match="pass the timesteps"):
        encode(table, ["a"])


def test_weights_become_log_bias_and_split_adds_value_part(layers):
    table = TagTable.create(layers, tags=["a", "b"], init_std=1.0, groups="single")
    out = encode(table, ["(a:2), b"])
    assert out.shape[-1] == table.width + 1
    torch.testing.assert_close(out[0, :, -1], torch.tensor([0.0, torch.log(torch.tensor(2.0)), 0.0]))
    table.set_value_source("b", torch.full((1, table.width), 7.0))
    out = encode(table, ["a, b"])
    assert out.shape[-1] == 2 * table.width
    assert torch.equal(out[0, 2, table.width:], torch.full((table.width,), 7.0))
    assert torch.equal(out[0, 1, table.width:], out[0, 1, : table.width]), "tied tags copy key into value part"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a safetensors file at all", "is not a readable .safetensors table"),
        (b"", "is not a readable .safetensors table"),
    ],
)
def test_corrupt_table_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CondvecError, match=message):
        TagTable.load(path)


def test_truncated_and_foreign_files(tmp_path, layers):
    table = TagTable.create(layers, tags=["a"])
    good = tmp_path / "good.safetensors"
    table.save(good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CondvecError, match="not a readable .safetensors table"):
        TagTable.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(CondvecError, match="without condvec metadata"):
        TagTable.load(foreign)
    future = tmp_path / "future.safetensors"
    meta = table.metadata() | {"format_version": 99}
    save_file({"data": table.data, "special": table.special}, future, metadata={"condvec": json.dumps(meta)})
    with pytest.raises(CondvecError, match="format version 99 is not supported"):
        TagTable.load(future)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TagTable.load(tmp_path / "missing.safetensors")


def test_table_for_unet_records_base_identity():
    unet = make_unet()
    table = table_for_unet(unet, tags=["a"], base_name="tiny-test")
    assert table.base_model["name"] == "tiny-test" and table.base_model["num_layers"] == 7


def test_open_maps_rows_and_encodes_like_load(tmp_path):
    """TagTable.open reads no rows up front; what a prompt encodes to is what a loaded table gives."""
    from conditioner import encode
    from conditioner.safefile import TableFileError

    for dtype in ("fp32", "fp16", "bf16"):
        table = TagTable.create(discover(make_unet()), tags=["red circle", "blue square", "cat"], init_std=1.0)
        path = tmp_path / f"t-{dtype}.safetensors"
        table.save(path, dtype=dtype)
        opened, loaded = TagTable.open(path), TagTable.load(path)
        assert opened.lazy and not loaded.lazy and opened.tags == loaded.tags
        prompts = ["red circle, (cat:1.5)", "blue square", ""]
        assert torch.equal(encode(opened, prompts), encode(loaded, prompts))
    data = table.data.clone()
    data[2, 0, 1] = float("nan")
    table.data = data
    from safetensors.torch import save_file

    from conditioner.table import METADATA_KEY
    save_file({"data": table.data, "special": table.special}, tmp_path / "nan.safetensors",
              metadata={METADATA_KEY: json.dumps(table.metadata())})
    opened = TagTable.open(tmp_path / "nan.safetensors")  # opening does not scan the rows
    encode(opened, ["red circle"])
    with pytest.raises(TableFileError, match="data of 'cat' holds NaN or infinite values"):
        encode(opened, ["cat"])


def test_every_field_is_stored_once_and_copied_deeply(layers):
    """The file codec names every non-tensor field of ``TagTable`` (so ``metadata``, ``load`` and ``copy`` cannot
    forget one), and a copy shares nothing mutable with its original."""
    from dataclasses import fields

    from conditioner.table import _METADATA

    tensors = {"data", "special", "values", "pooled", "null_pooled"}
    assert set(_METADATA) | tensors == {f.name for f in fields(TagTable)}
    table = TagTable.create(layers, groups="blocks")
    table.add_tags(["a", "b"], init="normal", seed=1)
    twin = table.copy()
    _assert_tables_equal(table, twin)
    twin.data.add_(1.0)
    twin.tags.append("c")
    twin.provenance.append({"op": "x"})
    twin.base_model["name"] = "other"
    assert "c" not in table.tags and table.provenance == [] and "name" not in table.base_model
    assert not torch.equal(table.data, twin.data)


def test_table_files_carry_modelspec_metadata(layers, tmp_path):
    """Model browsers read ``modelspec.*``: every saved table has a title, an architecture and a date."""
    from safetensors import safe_open

    table = TagTable.create(layers, groups="blocks", base_model={"name": "x", "family": "sdxl"})
    table.add_tags(["a"])
    table.save(tmp_path / "my concepts.safetensors")
    with safe_open(tmp_path / "my concepts.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "my concepts"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/condvec-table"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and len(meta["modelspec.date"]) == 10
    assert "1 tags" in meta["modelspec.description"]
    _assert_tables_equal(table, TagTable.load(tmp_path / "my concepts.safetensors"))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_streamed_drop_and_rename_equal_the_in_memory_edit(layers, tmp_path, dtype):
    """A skeleton edited by whole rows and written by ``save_streamed`` from the memory-mapped source gives the same
    file contents as the edit on the loaded table — pooled rows and split value sources included."""
    from merge.tables import drop, rename

    table = TagTable.create(layers, groups="blocks")
    table.add_tags([f"t{i}" for i in range(40)], init="normal", std=0.5, seed=3)
    table.pooled, table.null_pooled = torch.randn(40, 6), torch.randn(6)
    table.set_value_source("t7", torch.randn(table.num_anchors, table.width))
    table.save(tmp_path / "src.safetensors", dtype=dtype)
    loaded, opened = TagTable.load(tmp_path / "src.safetensors"), TagTable.open(tmp_path / "src.safetensors")

    dropped = drop(opened.skeleton(), ["t3", "t20"], match=r"^t3\d$")
    dropped.save_streamed(tmp_path / "drop.safetensors", opened, [opened.index[n] for n in dropped.tags], dtype=dtype,
                          chunk=7)
    expected = drop(loaded, ["t3", "t20"], match=r"^t3\d$")
    _assert_tables_equal(TagTable.load(tmp_path / "drop.safetensors"), expected)
    assert torch.equal(TagTable.load(tmp_path / "drop.safetensors").pooled, expected.pooled)
    assert len(TagTable.open(tmp_path / "drop.safetensors")) == len(expected) == 28

    renamed = rename(opened.skeleton(), "t7", "seven")
    renamed.save_streamed(tmp_path / "rename.safetensors", opened, list(range(len(opened))), dtype=dtype, chunk=16)
    _assert_tables_equal(TagTable.load(tmp_path / "rename.safetensors"), rename(loaded, "t7", "seven"))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("on_conflict", ["left", "right", "mean"])
def test_streamed_combine_equals_the_in_memory_combine(layers, tmp_path, dtype, on_conflict):
    """``condvec-merge combine`` streams both memory-mapped tables into the new file: the same table as combining the
    loaded tables, conflicts, split value sources and pooled rows included (right's pooled rows go with its rows)."""
    from merge.tables import combine, combine_streamed

    def make(names, seed):
        table = TagTable.create(layers, groups="blocks")
        table.add_tags(names, init="normal", std=0.5, seed=seed)
        table.pooled, table.null_pooled = torch.randn(len(names), 6, generator=torch.Generator().manual_seed(seed)), \
            torch.zeros(6)
        return table

    left, right = make([f"t{i}" for i in range(30)], 1), make([f"t{i}" for i in range(20, 45)], 2)
    right.data[right.row("t22")] = left.data[left.row("t22")]  # in both, identical: not a conflict
    right.set_value_source("t40", torch.randn(right.num_anchors, right.width))
    left.save(tmp_path / "l.safetensors", dtype=dtype)
    right.save(tmp_path / "r.safetensors", dtype=dtype)
    loaded = [TagTable.load(tmp_path / f"{n}.safetensors") for n in "lr"]
    opened = [TagTable.open(tmp_path / f"{n}.safetensors") for n in "lr"]
    expected = combine(*loaded, on_conflict=on_conflict)
    combine_streamed(*opened, tmp_path / "c.safetensors", on_conflict=on_conflict)
    streamed = TagTable.load(tmp_path / "c.safetensors")
    _assert_tables_equal(streamed, expected)
    assert torch.equal(streamed.pooled, expected.pooled) and len(streamed) == 45
    assert len(expected.provenance[-1]["conflicts"]) == 9  # t20 … t29 but t22
    kept = {"left": loaded[0], "right": loaded[1]}.get(on_conflict)
    if kept is not None:
        assert torch.equal(expected.data[expected.row("t25")], kept.data[kept.row("t25")])
        assert torch.equal(expected.pooled[expected.row("t25")], kept.pooled[kept.row("t25")])
    assert torch.equal(expected.pooled[expected.row("t44")], loaded[1].pooled[loaded[1].row("t44")])


def test_streamed_write_refuses_a_bad_row_and_leaves_the_old_file(layers, tmp_path):
    from conditioner.safefile import TableFileError

    table = TagTable.create(layers, groups="single")
    table.add_tags(["a", "b", "c"], init="normal", std=0.5)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the user's file")
    source = table.copy()
    source.data[1, 0, 0] = float("nan")
    with pytest.raises(TableFileError, match="data of 'b' holds NaN"):
        table.skeleton().save_streamed(out, source, [0, 1, 2])
    assert out.read_bytes() == b"the user's file"
