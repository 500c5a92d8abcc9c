"""The config reference (docs/config.md) is the schema's: every key, default and help text, generated."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
config_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_reference)


def test_readme_config_reference_equals_the_schema():
    table = config_reference.readme_table((ROOT / "docs" / "config.md").read_text(encoding="utf-8"))
    assert table is not None, "docs/config.md lost its config reference markers"
    assert table == config_reference.reference_table(), (
        "docs/config.md is out of date: regenerate with `python scripts/config_reference.py`")


def test_reference_lists_every_key_with_its_real_default():
    from omegaconf import OmegaConf

    from train.config import RunConfig, schema_help

    rows = config_reference.reference_table().splitlines()[2:]
    keys = [key for key, _, _ in schema_help()]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == keys
    defaults = OmegaConf.structured(RunConfig)
    by_key = {row.split(" | ")[0].strip("| `"): row.split(" | ")[1] for row in rows}
    assert by_key["training.steps"] == f"`{defaults.training.steps}`"
    assert by_key["training.lr"] == ("`null`" if defaults.training.lr is None else f"`{defaults.training.lr!r}`")
    assert by_key["table.pad_to"] == ("`null`" if defaults.table.pad_to is None else f"`{defaults.table.pad_to}`")


def test_the_config_reference_states_the_learning_rate_table():
    """The measured default rates have one home (train.optim.TABLE_LR); the reference reads them from it."""
    from train.optim import TABLE_LR

    row = next(line for line in (ROOT / "docs" / "config.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `training.lr` |"))
    for kind, rates in TABLE_LR.items():
        for rate in rates.values():
            assert f"{rate:g}" in row, (kind, rate, row)
