import subprocess
import sys

import pytest
import torch

from train.config import ConfigError, load_config
from train.optim import RowSparseAdamW, lr_at

BASE = ["data.path=somewhere", "model.builtin=micro"]


def test_row_sparse_adamw_touches_only_given_rows_with_momentum_and_decay():
    """Invariant 3 at optimiser level: rows outside the step are bit-identical, their state too."""
    torch.manual_seed(0)
    data = torch.randn(6, 2, 5)
    opt = RowSparseAdamW(6, (2, 5), weight_decay=0.1)
    opt.step(data, torch.tensor([0, 1, 2]), torch.randn(3, 2, 5), lr=0.1)  # momentum now non-zero for 0..2
    before, m_before = data.clone(), opt.exp_avg.clone()
    opt.step(data, torch.tensor([2, 4]), torch.randn(2, 2, 5), lr=0.1)
    for r in (0, 1, 3, 5):
        assert torch.equal(data[r], before[r]), f"row {r} moved without being in the batch"
        assert torch.equal(opt.exp_avg[r], m_before[r])
    assert not torch.equal(data[2], before[2]) and not torch.equal(data[4], before[4])
    assert opt.steps.tolist() == [1, 1, 2, 0, 1, 0], "per-row step counts drive bias correction"


def test_row_sparse_adamw_matches_torch_adamw_on_a_dense_row():
    torch.manual_seed(1)
    start = torch.randn(1, 3, 4)
    ours = start.clone()
    ref = torch.nn.Parameter(start.clone())
    opt_ref = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.2, eps=1e-8)
    opt = RowSparseAdamW(1, (3, 4), weight_decay=0.2)
    for _ in range(5):
        g = torch.randn(1, 3, 4)
        ref.grad = g.clone()
        opt_ref.step()
        opt.step(ours, torch.tensor([0]), g, lr=0.05)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)


def test_lr_schedules():
    assert lr_at(0, 1.0, "constant", 4, 100) == 0.25
    assert lr_at(10, 1.0, "constant", 4, 100) == 1.0
    assert lr_at(100, 1.0, "linear", 0, 100) == 0.0
    assert abs(lr_at(50, 1.0, "cosine", 0, 100) - 0.5) < 1e-9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.setps=3"], "unknown config key 'training.setps' — did you mean 'training.steps'?"),
        (["trainig.steps=3"], "did you mean 'training'?"),
        (["lr=3"], "did you mean 'training.lr'?"),
        (["training.steps=abc"], "bad value for 'training.steps'"),
        (["training.steps=0"], "'training.steps' must be >= 1"),
        (["table.mode=dense"], "'table.mode' must be one of vector, kv"),
        (["model.pretrained=x"], "set exactly one of model.pretrained, model.single_file, model.builtin"),
        (["data.tag_dropout=1.5"], "'data.tag_dropout' must be in [0, 1)"),
        (["training.steps"], "must look like key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + overrides)
    assert message in str(info.value)


def test_missing_required_value():
    with pytest.raises(ConfigError, match="missing required value 'data.path'"):
        load_config(None, ["model.builtin=micro"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  builtin: micro\ndata:\n  path: d\ntraining:\n  steps: 7\n  lr: 0.5\n")
    cfg = load_config(str(path), ["training.steps=9"])
    assert cfg.training.steps == 9 and cfg.training.lr == 0.5 and cfg.data.path == "d"
    path.write_text("model:\n  builtin: micro\ndata:\n  path: d\n  flipp: true\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.flipp' — did you mean 'data.flip'"):
        load_config(str(path))


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  builtin: micro\ndata:\n  path: d\n")
    result = subprocess.run([sys.executable, "-m", "train.cli", str(path), "training.batchsize=4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("condvec-train: error: unknown config key 'training.batchsize' — "
                                     "did you mean 'training.batch_size'?")
    shown = subprocess.run([sys.executable, "-m", "train.cli", str(path), "training.steps=5", "--print-config"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "steps: 5" in shown.stdout and "builtin: micro" in shown.stdout


def test_default_table_lr_follows_the_layout():
    from conditioner import TagTable
    from train.model import build_builtin
    from train.optim import default_lr
    from unet_patch import discover

    layers = discover(build_builtin("micro"))
    new = True  # table.freeze_existing: only new concepts train
    assert default_lr(TagTable.create(layers, groups="layers"), new) == 0.3
    assert default_lr(TagTable.create(layers, groups="blocks"), new) == 0.3
    assert default_lr(TagTable.create(layers, groups="single"), new) == 0.5
    assert default_lr(TagTable.create(layers, mode="kv"), new) == 0.15
    assert default_lr(TagTable.create(layers, groups="layers")) == 1e-2  # every tag trains
    assert default_lr(TagTable.create(layers, groups="single")) == 5e-2
    assert default_lr(TagTable.create(layers, mode="kv")) == 5e-2
