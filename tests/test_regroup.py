"""Tables move between layouts: regroup (vector groupings) and kv_table (through each layer's projections)."""

import pytest
import torch
from testkit import make_unet

from conditioner import TagTable, encode, regroup
from conditioner.errors import CondvecError
from unet_patch import discover, kv_table, patched


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def _table(unet, groups="single"):
    table = TagTable.create(discover(unet), tags=["red", "blue", "cat"], groups=groups, pad_to=6, init_std=1.0)
    table.set_value_source("cat", torch.randn(1, table.width))
    return table


def _run(unet, table, prompt="red, cat, (blue:1.4)"):
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with patched(unet, table):
        return unet(x, 10, encoder_hidden_states=encode(table, [prompt])).sample


def test_single_to_layers_to_single_round_trips_exactly(unet):
    table = _table(unet)
    layers = regroup(table, "layers")
    assert len(layers.group_names) == len(table.layers)
    back = regroup(layers, "single")
    assert torch.equal(back.data, table.data) and torch.equal(back.special, table.special)
    assert torch.equal(back.values["cat"], table.values["cat"])
    assert back.tags == table.tags and back.group_kind == "single"


def test_layers_to_blocks_averages_each_blocks_layers(unet):
    table = _table(unet, "layers")
    blocks = regroup(table, "blocks")
    dim = table.dim
    for g, name in enumerate(blocks.group_names):
        members = [li for li, layer in enumerate(table.layers) if layer.block == name]
        expected = torch.stack([table.data[:, :, li * dim:(li + 1) * dim] for li in members]).double().mean(0)
        torch.testing.assert_close(blocks.data[:, :, g * dim:(g + 1) * dim].double(), expected)


def test_regrouped_table_generates_the_same_output(unet):
    table = _table(unet, "blocks")
    torch.testing.assert_close(_run(unet, regroup(table, "layers")), _run(unet, table), rtol=0, atol=0)


def test_to_kv_generates_the_same_output(unet):
    table = _table(unet, "blocks")
    kv = kv_table(table, unet)
    assert kv.mode == "kv" and kv.tags == table.tags
    torch.testing.assert_close(_run(unet, kv), _run(unet, table), rtol=1e-5, atol=1e-6)


def test_kv_tables_cannot_be_regrouped(unet):
    with pytest.raises(CondvecError, match="key/value-mode"):
        regroup(TagTable.create(discover(unet), mode="kv"), "single")


def test_merge_cli_regroup(tmp_path, unet, capsys):
    from merge.cli import main

    table = _table(unet)
    table.save(tmp_path / "t.safetensors")
    assert main(["regroup", str(tmp_path / "t.safetensors"), "--groups", "layers", "-o",
                 str(tmp_path / "l.safetensors")]) == 0
    layers = TagTable.load(tmp_path / "l.safetensors")
    assert len(layers.group_names) == len(table.layers)
    assert torch.equal(regroup(layers, "single").data, table.data)
    assert "regrouped single" in capsys.readouterr().out
    kv_table(table, unet).save(tmp_path / "kv.safetensors")
    assert main(["regroup", str(tmp_path / "kv.safetensors"), "--groups", "single", "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "key/value-mode" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
