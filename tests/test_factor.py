"""Factorised per-layer rows: each tag's own shared vector plus its own rank-r per-group offsets.

Round trips both ways, storage, encoding, training (rows independent, resume exact) and merging on factors.
"""

import pytest
import torch
from testkit import make_unet, micro_config, run_until_killed

from conditioner import TagTable, encode
from conditioner.errors import CondvecError
from conditioner.factor import FactorRows, compose, decompose, factorise, unfactorise
from conditioner.regroup import regroup
from demo.data import generate_demo_dataset
from merge import blend, combine, drop, extract, rename
from merge.cli import main
from train.loop import Trainer
from unet_patch import table_for_unet

TAGS = ["cat", "dog", "elephant", "glass"]


def _table(tags=TAGS, seed=0) -> TagTable:
    return table_for_unet(make_unet(), tags=list(tags), anchors=2, init_std=1.0, seed=seed, base_name="tiny")


def _all(rows) -> torch.Tensor:
    return rows[torch.arange(len(rows))]


def test_full_to_factorised_and_back():
    table = _table()
    groups = len(table.group_names)
    exact, error = factorise(table, groups - 1)  # the offsets of G groups have rank <= G - 1: exact
    assert error < 1e-6 and torch.allclose(_all(exact.data), table.data, atol=1e-5)
    low, low_error = factorise(table, 2)
    assert 0.05 < low_error < 1.0 and isinstance(low.data, FactorRows) and low.data.rank == 2
    # the best rank-2 approximation: no rank-2 factorisation of these offsets does better than the SVD's
    rebuilt = _all(low.data)
    assert float((rebuilt - table.data).norm() / table.data.norm()) == pytest.approx(low_error, rel=1e-5)
    # factorised -> full is exact: the rows it gives are the rows the factors make
    full = unfactorise(low)
    assert isinstance(full.data, torch.Tensor) and torch.equal(full.data, rebuilt)
    # a row whose groups are all alike (bootstrapped from CLIP, or zeros) factorises exactly at any rank
    alike = table.data[:1, :, : table.dim].repeat(1, 1, groups)  # (1, A, G·D)
    shared, coef, basis = decompose(alike, groups, 1)
    assert torch.equal(coef, torch.zeros_like(coef)) and torch.allclose(compose(shared, coef, basis), alike)
    assert torch.allclose(basis.square().sum(-1), torch.ones(basis.shape[:-1]))  # somewhere to train towards
    with pytest.raises(CondvecError, match="rank must be in"):
        factorise(table, groups)


def test_factorised_tables_save_load_and_encode_like_their_full_rows(tmp_path):
    table, _ = factorise(_table(), 2)
    path = tmp_path / "f.safetensors"
    table.save(path)
    for loaded in (TagTable.load(path), TagTable.open(path)):
        assert isinstance(loaded.data, FactorRows)
        assert all(torch.equal(a, b) for a, b in zip(loaded.data.factors().values(), table.data.factors().values()))
    full = unfactorise(table)
    for prompt in ("cat, dog", "(glass:1.3), elephant"):
        assert torch.allclose(encode(table, [prompt], timesteps=300.0), encode(full, [prompt], timesteps=300.0),
                              atol=1e-6)
    with pytest.raises(CondvecError, match="train it in memory"):
        TagTable.open(path, writable=True)
    # fp16 storage keeps factorised rows factorised
    table.save(tmp_path / "h.safetensors", dtype="fp16")
    assert TagTable.load(tmp_path / "h.safetensors").data.rank == 2
    # stored numbers: D·(1 + r) + G·r per tag and anchor, against G·D for full rows
    groups, dim, anchors = len(table.group_names), table.dim, table.num_anchors
    assert table.data.numel() == len(table) * anchors * (dim * 3 + groups * 2)


def test_training_factorised_rows_changes_only_the_batch_tags_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(data, 24, size=32, seed=3)
    extra = ("table.factor_rank=2", "training.lr=0.05", "training.ema_decay=0.9", "output.keep_last=2")
    trainer = Trainer(micro_config(data, tmp_path / "probe", *extra, steps=6))
    assert isinstance(trainer.table.data, FactorRows) and [p.attr for p in trainer.params][:3] == [
        "data.shared", "data.coef", "data.basis"]
    for _ in range(2):
        trainer.train_step()
    before = {n: t.clone() for n, t in trainer.table.data.factors().items()}
    plans = trainer.planner.plan(trainer.state.step)
    present = {trainer.table.row(t.name) for p in plans for t in p.tags}
    trainer.train_step()
    for name, tensor in trainer.table.data.factors().items():
        for row in range(len(trainer.table)):
            moved = not torch.equal(before[name][row], tensor[row])
            assert moved == (row in present) or (name == "basis" and not moved), (name, row)
    assert 0 < len(present) < len(trainer.table)

    full = Trainer(micro_config(data, tmp_path / "full", *extra, steps=6)).run()
    killed = Trainer(micro_config(data, tmp_path / "killed", *extra, steps=6))
    run_until_killed(killed, 5)
    result = Trainer(micro_config(data, tmp_path / "killed", *extra, "output.resume=latest", steps=6)).run()
    for key in ("table", "table_ema"):
        a, b = TagTable.load(full[key]), TagTable.load(result[key])
        assert isinstance(a.data, FactorRows) and all(
            torch.equal(x, y) for x, y in zip(a.data.factors().values(), b.data.factors().values()))


def test_merging_factorised_tables_works_on_the_factors(tmp_path, capsys):
    table, _ = factorise(_table(), 2)
    factors = table.data.factors()
    dropped = drop(table, ["dog"])
    kept = [table.row(n) for n in dropped.tags]
    assert all(torch.equal(t, factors[n][kept]) for n, t in dropped.data.factors().items())
    assert rename(table, "cat", "kitten").data.factors()["coef"].equal(factors["coef"])
    one = extract(table, ["glass"])
    assert torch.equal(one.data.factors()["basis"], factors["basis"][[table.row("glass")]])
    other, _ = factorise(_table(tags=["zebra", "cat"], seed=5), 2)
    both = combine(table, other, on_conflict="left")
    assert torch.equal(both.data.factors()["shared"][len(table):], other.data.factors()["shared"][:1])
    with pytest.raises(CondvecError, match="factorised at rank 2 vs full"):
        combine(table, _table(seed=1), on_conflict="left")
    # a blend is stored as its best rank-r approximation
    mixed = blend(table, "catdog", "0.5*cat + 0.5*dog")
    target = 0.5 * table.data[table.row("cat")] + 0.5 * table.data[table.row("dog")]
    assert isinstance(mixed.data, FactorRows)
    assert float((mixed.data[mixed.row("catdog")] - target).norm() / target.norm()) < 0.75
    with pytest.raises(CondvecError, match="unfactorise it first"):
        regroup(table, "blocks")

    path, out = tmp_path / "t.safetensors", tmp_path / "f.safetensors"
    _table().save(path)
    assert main(["factorise", str(path), "--rank", "2", "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert "factorised at rank 2" in line and "relative error" in line
    assert main(["drop", str(out), "dog", "-o", str(tmp_path / "d.safetensors")]) == 0
    assert isinstance(TagTable.load(tmp_path / "d.safetensors").data, FactorRows)
    assert main(["unfactorise", str(out), "-o", str(tmp_path / "u.safetensors")]) == 0
    back = TagTable.load(tmp_path / "u.safetensors")
    assert isinstance(back.data, torch.Tensor) and torch.equal(back.data, _all(TagTable.load(out).data))
    assert main(["factorise", str(path), "--rank", "99", "-o", str(tmp_path / "bad.safetensors")]) == 2
    assert "rank must be in" in capsys.readouterr().err
