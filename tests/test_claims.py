"""``benchmarks.claims`` at its tiny preset: every method and study runs, and what it reports is well-formed."""

import json

import pytest

pytest.importorskip("peft")


def test_claims_tiny(tmp_path):
    from benchmarks import claims

    assert claims.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "claims.json").read_text())

    one = report["one concept"]
    assert set(one) == set(claims.METHODS)
    width = 64  # mini-sd's cross_attention_dim; 7 cross-attention layers
    assert one["textual inversion"]["parameters"] == {"per concept": width, "shared": 0}
    assert one["XTI"]["parameters"]["per concept"] == 7 * width
    assert one["condvec single"]["parameters"]["per concept"] == width
    assert one["condvec layers"]["parameters"]["per concept"] == 7 * width
    assert one["condvec kv"]["parameters"]["per concept"] == 2 * 7 * width
    assert one["condvec layers+anchors"]["parameters"]["per concept"] == 2 * 7 * width
    assert one["LoRA"]["parameters"]["per concept"] == 0 and one["LoRA"]["parameters"]["shared"] > 0
    assert one["DreamBooth"]["parameters"]["shared"] == 1_687_652  # the whole UNet
    for name, result in one.items():
        assert len(result["sweep"]) == 2, name  # the tiny preset sweeps two learning rates
        assert any(abs(result["best lr"] - float(lr)) <= 1e-2 * float(lr) for lr in result["sweep"]), name
        assert [p["step"] for p in result["curve"]] == [1, 2]
        assert all(0.0 <= p["fidelity"] <= 1.0 for p in result["curve"])

    assert set(report["capacity"]) == {"3", "4"}
    assert set(report["capacity"]["4"]) == {"condvec layers", "LoRA"}

    for name in claims.METHODS:
        second = report["isolation"][name]["rounds"][1]
        assert set(second["earlier concepts"]) == {claims.concept_names(1, start=5000)[0]}
        if name != "LoRA":  # condvec rows, and the earlier concepts' tokens of the CLIP methods, stay frozen
            assert second["earlier rows bit-identical"] is True, name
    assert report["isolation"]["LoRA"]["rounds"][1]["earlier rows bit-identical"] is None

    for name, result in report["bleeding"].items():
        crossed = result["2 concepts"]["objects with a crossed attribute"]  # None: no sample had two objects
        assert crossed is None or 0.0 <= crossed <= 1.0, name
    assert "condvec layers" in report["key/value"]
    assert len(report["seeds"]["condvec layers"]["fidelity by seed"]) == 2
    assert "**Study 6" in (tmp_path / "claims.md").read_text()
    for png in ("one-concept.png", "capacity.png", "capacity-samples.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_combine_merges_capacity_and_refuses_other_learning_rates(tmp_path):
    from benchmarks.claims import _part, combine

    one = {"command": "a", "machine": "m", "settings": {}, "seconds": {}, "learning rates": {"LoRA": 1e-3},
           "one concept": {"LoRA": {}}, "capacity": {"10": {"LoRA": {"fidelity": 0.5}}}}
    big = {"command": "b", "machine": "m", "settings": {}, "seconds": {}, "learning rates": {"LoRA": 1e-3},
           "capacity": {"1000": {"LoRA": {"fidelity": 0.1}}}, "isolation": {"LoRA": {}}}
    report = combine([one, big])
    assert list(report["capacity"]) == ["10", "1000"] and "isolation" in report and report["commands"] == ["a", "b"]
    with pytest.raises(SystemExit, match="other learning rates"):
        combine([one, big | {"learning rates": {"LoRA": 3e-3}}])
    with pytest.raises(SystemExit, match="capacity N=10 is in two runs"):
        combine([one, big | {"capacity": {"10": {}}}])
    (tmp_path / "big.json").write_text(json.dumps(big))
    assert set(_part(f"{tmp_path / 'big.json'}:3")) == {"command", "machine", "settings", "seconds", "learning rates",
                                                         "isolation"}  # only study 3 taken from that run
    assert "capacity" in _part(str(tmp_path / "big.json"))
