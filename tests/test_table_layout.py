"""One layout object (conditioner.table_layout.Layout) owns a table's shape: its defaults, its rules, and every entry
point that makes or extends a table takes it."""

import re
from pathlib import Path

import pytest
import torch
from standins import make_sd15
from testkit import make_unet

from bootstrap.table import add_bootstrapped_tags, bootstrap_table
from conditioner.table import TagTable
from conditioner.table_layout import Layout, LayoutError
from train.config import ConfigError, load_config
from unet_patch import discover, table_for_unet
from unet_patch.load import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_three_starting_layouts():
    assert (Layout().groups, Layout().pad_to, Layout().vectors) == ("layers", None, 1)
    assert (Layout.pretrained().groups, Layout.pretrained().pad_to, Layout.pretrained().vectors) == ("single", 77, 1)
    distilled = Layout.distilled()
    assert (distilled.groups, distilled.pad_to, distilled.tokens_per_tag, distilled.context_rows) == (
        "single", 77, 3, 16)
    assert Layout.distilled(context_rows=4).vectors == 7


@pytest.mark.parametrize("fields, field", [
    ({"mode": "dense"}, "mode"),
    ({"groups": "rows"}, "groups"),
    ({"groups": {}}, "groups"),
    ({"anchors": 0}, "anchors"),
    ({"anchors": (500.0, 100.0)}, "anchors"),
    ({"tokens_per_tag": 0}, "tokens_per_tag"),
    ({"tokens_per_tag": 1.5}, "tokens_per_tag"),
    ({"context_rows": -1}, "context_rows"),
    ({"tokens_per_tag": 1000, "context_rows": 1000}, "tokens_per_tag"),
    ({"pad_to": 0}, "pad_to"),
    ({"pad_to": 5000}, "pad_to"),
    ({"use_sink": "yes"}, "use_sink"),
])
def test_bad_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(LayoutError) as info:
        Layout(**fields)
    assert info.value.field == field and str(info.value).startswith(field)


def test_pretrained_layout_is_bounded_by_the_text_encoders_positions():
    with pytest.raises(LayoutError, match="tokens_per_tag must be at most 75"):
        Layout.pretrained(tokens_per_tag=76)
    with pytest.raises(LayoutError, match="context_rows must be at most 76"):
        Layout.pretrained(context_rows=77)
    Layout(tokens_per_tag=76)  # a table trained from scratch has no such bound


def test_create_takes_a_layout_or_its_fields_alike():
    layers = discover(make_unet())
    layout = Layout(groups="blocks", anchors=2, pad_to=12, tokens_per_tag=2)
    a = TagTable.create(layers, tags=["cat"], layout=layout)
    b = TagTable.create(layers, tags=["cat"], groups="blocks", anchors=2, pad_to=12, tokens_per_tag=2)
    assert a.group_names == b.group_names and a.anchors == b.anchors and a.pad_to == b.pad_to == 12
    assert a.tags == b.tags == ["cat", "cat#2"]
    with pytest.raises(TypeError, match="layout fields are"):
        TagTable.create(layers, padding=3)


def test_layout_of_a_table_round_trips(tmp_path):
    layout = Layout(groups="blocks", anchors=3, pad_to=20, use_sink=False)
    table = table_for_unet(make_unet(), tags=["cat"], layout=layout)
    table.save(tmp_path / "t.safetensors")
    assert Layout.of(TagTable.load(tmp_path / "t.safetensors")) == layout.replace(
        anchors=tuple(table.anchors))
    kv = table_for_unet(make_unet(), tags=["cat"], mode="kv")
    assert Layout.of(kv).mode == "kv"
    layers = discover(make_unet())
    custom = TagTable.create(layers, groups={"first": [layers[0].name], "rest": [x.name for x in layers[1:]]})
    again = TagTable.create(layers, layout=Layout.of(custom))
    assert (again.group_kind, again.group_names, again.layer_group) == ("custom", ["first", "rest"],
                                                                        custom.layer_group)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return load_model(make_sd15(tmp_path_factory.mktemp("layout")))


def test_new_tags_get_the_tables_own_block_size(sd15):
    table = bootstrap_table(sd15, ["red", "glass"], layout=Layout.distilled(context_rows=2), progress=False)
    assert Layout.of(table).vectors == 5
    assert add_bootstrapped_tags(table, sd15, ["smile"], progress=False) == ["smile"]
    assert [table.tags[r] for r in table.expand("smile")] == ["smile", "smile#2", "smile#3", "smile#4", "smile#5"]
    add_bootstrapped_tags(table, sd15, ["elephant"], tokens_per_tag=1, context_rows=0, progress=False)
    assert len(table.expand("elephant")) == 1
    plain = bootstrap_table(sd15, ["red"], progress=False)
    add_bootstrapped_tags(plain, sd15, ["glass"], progress=False)
    assert len(plain.expand("glass")) == 1
    assert torch.equal(plain.data[plain.expand("glass")[0]], table.data[table.expand("glass")[0]])


@pytest.mark.parametrize("override, message", [
    ("table.groups=rows", "'table.groups' must be one of single, blocks, layers"),
    ("table.anchors=0", r"'table.anchors' must be in \[1, 1000\]"),
    ("table.context_rows=-2", r"'table.context_rows' must be a whole number in \[0, 1024\]"),
    ("table.pad_to=0", r"'table.pad_to' must be null or a whole number"),
])
def test_the_run_configs_layout_rules_are_the_layouts(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.builtin=tiny", f"data.path={tmp_path}", override])


def test_each_layout_default_is_defined_once():
    """``DEFAULT_GROUPS = …`` and the other defaults are assigned in one module, outside tests and docs."""
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", ".git"} & set(p.relative_to(ROOT).parts)
               and not p.relative_to(ROOT).parts[0].startswith(".")]
    for name in ("DEFAULT_GROUPS", "BOOTSTRAP_GROUPS", "SD_SEQUENCE", "DEFAULT_MODE", "DISTILL_TOKENS", "TABLE_LR",
                 "GROUPINGS", "MODES"):
        homes = [str(p.relative_to(ROOT)) for p in sources
                 if re.search(rf"^(?:[A-Z_]+, )*{name}(?:, [A-Z_]+)*\s*(?::[^=]*)?=", p.read_text(), re.M)]
        assert len(homes) == 1, (name, homes)
