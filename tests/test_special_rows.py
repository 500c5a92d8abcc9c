"""Position-dependent padding, pooled vectors (SDXL) and mean-of-named-tags init."""

import pytest
import torch
from testkit import make_unet

from conditioner import TagTable, encode
from conditioner.encode import encode_pooled
from conditioner.errors import CondvecError
from unet_patch import discover


@pytest.fixture(scope="module")
def layers():
    return discover(make_unet())


def _null_table(layers, length=77, pooled=False):
    table = TagTable.create(layers, tags=["red", "blue", "green"], groups="single", pad_to=length, init_std=1.0)
    gen = torch.Generator().manual_seed(3)
    table.special = torch.randn(length, 1, table.width, generator=gen)  # a whole null sequence, one row a position
    if pooled:
        table.pooled = torch.randn(3, 5, generator=gen)
        table.null_pooled = torch.randn(5, generator=gen)
    return table


def test_null_prompt_is_the_stored_sequence_position_by_position(layers):
    table = _null_table(layers)
    null = encode(table, [""])
    assert null.shape == (1, 77, table.width)
    assert torch.equal(null[0], table.special[:, 0])


def test_tags_replace_positions_and_padding_keeps_its_position(layers):
    table = _null_table(layers)
    out = encode(table, ["blue, red"])[0]
    assert torch.equal(out[0], table.special[0, 0])  # sink
    assert torch.equal(out[1], table.data[table.row("blue"), 0])
    assert torch.equal(out[2], table.data[table.row("red"), 0])
    assert torch.equal(out[3:], table.special[3:, 0])  # padding at position i is row i


def test_longer_than_the_null_sequence_repeats_its_last_row(layers):
    table = _null_table(layers, length=3)
    out = encode(table, ["red, blue, green"])[0]  # sink + 3 tags = 4 positions > 3 stored rows
    assert out.shape[0] == 4
    out = encode(table, ["red"], pad_to=6)[0]
    assert torch.equal(out[2], table.special[2, 0])
    assert torch.equal(out[3:], table.special[2, 0].expand(3, -1))


def test_one_padding_row_pads_every_position(layers):
    table = TagTable.create(layers, tags=["red"], pad_to=10)
    out = encode(table, ["red"])[0]
    assert torch.equal(out[2:], table.special[1, 0].expand(8, -1))


def test_special_rows_roundtrip_and_validate(tmp_path, layers):
    table = _null_table(layers, pooled=True)
    table.negative_zeros = True
    table.save(tmp_path / "t.safetensors")
    loaded = TagTable.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded.special, table.special)
    assert torch.equal(loaded.pooled, table.pooled) and torch.equal(loaded.null_pooled, table.null_pooled)
    assert loaded.negative_zeros
    with pytest.raises(CondvecError, match="special rows"):
        TagTable(layers=table.layers, mode="vector", group_names=table.group_names, layer_group=table.layer_group,
                 anchors=table.anchors, tags=[], data=table.data[:0], special=table.special[:1])


def test_pooled_is_the_weighted_mean_of_tags_and_null_for_empty(layers):
    table = _null_table(layers, pooled=True)
    got = encode_pooled(table, ["red, (blue:3)", "", "green"])
    r, b, g = (table.pooled[table.row(n)] for n in ("red", "blue", "green"))
    torch.testing.assert_close(got[0], (r + 3 * b) / 4)
    assert torch.equal(got[1], table.null_pooled)
    torch.testing.assert_close(got[2], g)
    # new tags start from the null pooled vector; removing keeps rows aligned
    table.add_tags(["violet"])
    assert torch.equal(table.pooled[table.row("violet")], table.null_pooled)
    table.remove_tags(["red"])
    assert table.pooled.shape[0] == len(table) and torch.equal(table.pooled[table.row("green")], g)


def test_pooled_needs_an_sdxl_table(layers):
    with pytest.raises(CondvecError, match="no pooled vectors"):
        encode_pooled(TagTable.create(layers, tags=["red"]), ["red"])


def test_init_mean_of_named_tags_uses_exactly_those_rows(layers):
    table = TagTable.create(layers, tags=["digit 0", "digit 1", "digit 2", "cat"], init_std=1.0)
    table.add_tags(["digit 9"], init="mean:digit 0, digit 1,digit 2")
    expected = table.data[[0, 1, 2]].double().mean(0).float()
    assert torch.equal(table.data[table.row("digit 9")], expected)
    assert not torch.allclose(expected, table.data[:4].double().mean(0).float())  # not the mean of all rows
    with pytest.raises(KeyError, match="unknown tag"):
        table.add_tags(["x"], init="mean:digit 0,dog")


def test_multi_vector_tags_expand_to_all_their_positions(tmp_path, layers):
    table = TagTable.create(layers, tags=["red"], pad_to=8, init_std=1.0)
    rows = table.add_tags(["mascot"], init="normal", std=1.0, vectors=3)
    assert [table.tags[r] for r in rows] == ["mascot", "mascot#2", "mascot#3"]
    out = encode(table, ["red, (mascot:2)"])
    assert torch.equal(out[0, 2:5, :table.width], table.data[rows, 0])
    assert out.shape[1] == 8 and out.shape[2] == table.width + 1  # weight 2 → bias channel on all three
    assert torch.allclose(out[0, 2:5, -1], torch.log(torch.tensor(2.0)).expand(3))
    table.rename_tag("mascot", "hero")
    assert table.vectors == {"hero": 3} and "hero#3" in table
    table.save(tmp_path / "t.safetensors")
    loaded = TagTable.load(tmp_path / "t.safetensors")
    assert loaded.vectors == {"hero": 3} and loaded.expand("hero") == table.expand("hero")
    loaded.remove_tags(["hero"])
    assert loaded.tags == ["red"] and loaded.vectors == {}
