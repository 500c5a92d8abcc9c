import math

import pytest
import torch
from testkit import capture_kv_inputs, make_unet

from conditioner import TagTable, encode
from conditioner.errors import CondvecError
from merge import blend, combine, drop, extract, mix, parse_weights, rename, select_groups, swap
from unet_patch import discover, patched, table_for_unet

TAGS = ["elephant", "glass", "cat", "dog"]
X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
T = 333.0  # between the anchors 0 and 999 of two-anchor tables, so both anchors count


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def _table(mode="vector", groups="layers", anchors=1, seed=0, tags=TAGS, **kwargs) -> TagTable:
    table = table_for_unet(make_unet(), tags=list(tags), mode=mode, groups=groups, anchors=anchors, init_std=1.0,
                           seed=seed, base_name="tiny", **kwargs)
    table.counts = {name: 10 * (i + 1) for i, name in enumerate(table.tags)}
    return table


def _at(table: TagTable, source: torch.Tensor, t: float = T) -> torch.Tensor:
    """A ``(A, W)`` source interpolated at timestep t by hand (linear between the two nearest anchors)."""
    if table.num_anchors == 1:
        return source[0]
    lo, hi = table.anchors
    frac = (t - lo) / (hi - lo)
    return (1 - frac) * source[0] + frac * source[1]


def _snapshot(table: TagTable) -> dict:
    return {"data": table.data.clone(), "special": table.special.clone(), "tags": list(table.tags),
            "values": {k: v.clone() for k, v in table.values.items()}, "counts": dict(table.counts),
            "provenance": list(table.provenance)}


def _same_snapshot(a: dict, b: dict) -> bool:
    return (torch.equal(a["data"], b["data"]) and torch.equal(a["special"], b["special"]) and a["tags"] == b["tags"]
            and a["values"].keys() == b["values"].keys() and all(torch.equal(a["values"][k], b["values"][k])
                                                                  for k in a["values"])
            and a["counts"] == b["counts"] and a["provenance"] == b["provenance"])


def _selected_layers(table: TagTable, groups: list[int]) -> set[str]:
    return {layer.name for li, layer in enumerate(table.layers) if table.layer_group[li] in groups}


# ----------------------------------------------------------------------------- invariant 4: swap
@pytest.mark.parametrize("anchors", [1, 2])
@pytest.mark.parametrize("rest", ["key", "value", "tied"])
@pytest.mark.parametrize("groups, spec, expected_layers", [
    ("layers", "down.*, mid", {"down.0.0", "down.1.0", "mid.0"}),
    ("layers", "IN03-OUT02", {"down.1.0", "mid.0", "up.1.0"}),
    ("blocks", "up_blocks.1", {"up.1.0", "up.1.1"}),
])
def test_swap_feeds_key_concept_to_to_k_and_value_concept_to_to_v_in_exactly_the_selected_layers(
    unet, groups, spec, expected_layers, rest, anchors
):
    """Invariant 4 (vector mode): to_k / to_v inputs of every layer, on a real UNet forward."""
    table = _table(groups=groups, anchors=anchors)
    # split concepts tell every source apart: the key concept has key source elephant and value source cat (so
    # rest="key", which keeps its split, differs from rest="tied"); the value concept has dog and glass
    table = swap(table, "split elephant", key="elephant", value="cat")
    table = swap(table, "split glass", key="dog", value="glass")
    out = swap(table, "new", key="split elephant", value="split glass", layers=spec, rest=rest)
    selected = _selected_layers(out, select_groups(out, spec))
    assert {layer.short for layer in out.layers if layer.name in selected} == expected_layers

    elephant, cat, dog, glass = (out.data[out.row(n)] for n in ("elephant", "cat", "dog", "glass"))
    rest_sources = {"key": (elephant, cat), "value": (dog, glass), "tied": (elephant, elephant)}[rest]
    seen, handles = capture_kv_inputs(unet)
    try:
        with patched(unet, out), torch.no_grad():
            cond = encode(out, ["new"], timesteps=T if anchors > 1 else None)
            unet(X, T, encoder_hidden_states=cond)
    finally:
        for handle in handles:
            handle.remove()
    slices = out.layer_slices()
    for layer in out.layers:
        cols = slice(slices[layer.name].key_start, slices[layer.name].key_end)
        key_source, value_source = (elephant, glass) if layer.name in selected else rest_sources
        to_k_input = seen[(layer.name, "to_k")][0, 1]  # token 0 is the sink, token 1 the tag
        to_v_input = seen[(layer.name, "to_v")][0, 1]
        assert torch.allclose(to_k_input, _at(out, key_source)[cols], atol=1e-6), (layer.short, "to_k")
        assert torch.allclose(to_v_input, _at(out, value_source)[cols], atol=1e-6), (layer.short, "to_v")
        # the sources differ, so the checks above tell them apart
        assert not torch.allclose(_at(out, elephant)[cols], _at(out, glass)[cols], atol=1e-3)


@pytest.mark.parametrize("anchors", [1, 2])
@pytest.mark.parametrize("rest", ["key", "value"])
def test_swap_kv_mode_attention_uses_key_concepts_K_and_value_concepts_V(unet, monkeypatch, rest, anchors):
    """Invariant 4 (key/value mode): to_k / to_v are bypassed, so spy on the K and V that reach attention."""
    table = _table(mode="kv", anchors=anchors)
    spec = "down.1.0, up.2"
    out = swap(table, "new", key="elephant", value="glass", layers=spec, rest=rest)
    assert not out.is_split("new")
    selected = _selected_layers(out, select_groups(out, spec))
    assert len(selected) == 3

    current, used, handles = {}, {}, []
    for layer in discover(unet):
        attn = unet.get_submodule(layer.name)
        handles.append(attn.register_forward_pre_hook(lambda m, a, name=layer.name: current.update(layer=name)))
        handles.append(attn.register_forward_hook(lambda m, a, o: current.clear()))
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if "layer" in current:
            used[current["layer"]] = (key.detach().clone(), value.detach().clone())  # (B, heads, N, head_dim)
        return real_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    try:
        with patched(unet, out), torch.no_grad():
            unet(X, T, encoder_hidden_states=encode(out, ["new"], timesteps=T if anchors > 1 else None))
    finally:
        for handle in handles:
            handle.remove()
    assert set(used) == {layer.name for layer in out.layers}
    elephant, glass = out.data[out.row("elephant")], out.data[out.row("glass")]
    for g, layer in enumerate(out.layers):
        key, value = (t.transpose(1, 2).reshape(1, -1, layer.inner_dim)[0, 1] for t in used[layer.name])
        k_cols = slice(out.group_columns(g).start, out.group_columns(g).start + layer.inner_dim)
        v_cols = slice(k_cols.stop, k_cols.stop + layer.inner_dim)
        if layer.name in selected:
            k_from, v_from = elephant, glass
        else:
            k_from = v_from = elephant if rest == "key" else glass
        assert torch.allclose(key, _at(out, k_from)[k_cols], atol=1e-6), (layer.short, "K")
        assert torch.allclose(value, _at(out, v_from)[v_cols], atol=1e-6), (layer.short, "V")
        assert not torch.allclose(_at(out, elephant)[k_cols], _at(out, glass)[k_cols], atol=1e-3)


def test_swap_sources_in_the_table_per_group_and_anchor():
    table = _table(groups="blocks", anchors=2)
    out = swap(table, "new", key="elephant", value="glass", layers="mid_block", rest="value")
    g = out.group_names.index("mid_block")
    cols = out.group_columns(g)
    key_source, value_source = out.data[out.row("new")], out.value_source("new")
    assert out.is_split("new")
    assert torch.equal(key_source[:, cols], table.data[table.row("elephant"), :, cols])
    assert torch.equal(value_source[:, cols], table.data[table.row("glass"), :, cols])
    others = torch.ones(out.width, dtype=torch.bool)
    others[cols] = False
    assert torch.equal(key_source[:, others], table.data[table.row("glass"), :, others])
    assert torch.equal(value_source[:, others], table.data[table.row("glass"), :, others])


# ----------------------------------------------------------------------------- blend
@pytest.mark.parametrize("expression, weights", [
    ("0.6*cat + 0.4*dog", {"cat": 0.6, "dog": 0.4}),
    ("0.7*cat + 0.7*dog", {"cat": 0.7, "dog": 0.7}),
    ("cat - 0.5*dog + 0.25*glass", {"cat": 1.0, "dog": -0.5, "glass": 0.25}),
])
@pytest.mark.parametrize("mode", ["vector", "kv"])
def test_blend_is_the_weighted_sum_per_group_and_anchor(expression, weights, mode):
    table = _table(mode=mode, groups="blocks", anchors=2)
    out = blend(table, "new", expression)
    expected = sum(w * table.data[table.row(name)] for name, w in weights.items())
    result = out.data[out.row("new")]
    assert result.shape == (2, table.width)
    assert torch.allclose(result, expected, atol=1e-6)
    assert not out.is_split("new")
    assert out.counts["new"] == 0
    assert out.provenance[-1] == {"op": "blend", "result": "new", "inputs": list(weights),
                                  "weights": list(weights.values()), "layers": None,
                                  "groups": list(range(len(table.group_names))), "slerp": False}


def test_blend_does_not_renormalise_weights_that_do_not_sum_to_one():
    table = _table(anchors=2)
    out = blend(table, "double", "2*cat")
    cat, double = table.data[table.row("cat")], out.data[out.row("double")]
    for g in range(len(table.group_names)):
        cols = table.group_columns(g)
        assert torch.allclose(double[:, cols].norm(dim=-1), 2 * cat[:, cols].norm(dim=-1))


def test_blend_with_layers_applies_only_there_and_the_first_tag_stands_elsewhere():
    table = _table(anchors=2)
    out = blend(table, "new", "0.5*dog + 0.5*cat", layers="up.*")
    dog, cat, new = (out.data[out.row(n)] for n in ("dog", "cat", "new"))
    up = select_groups(table, "up.*")
    assert up == [3, 4, 5, 6]
    for g in range(len(table.group_names)):
        cols = table.group_columns(g)
        if g in up:
            assert torch.allclose(new[:, cols], 0.5 * dog[:, cols] + 0.5 * cat[:, cols], atol=1e-6)
        else:
            assert torch.equal(new[:, cols], dog[:, cols])
    assert out.provenance[-1]["layers"] == "up.*" and out.provenance[-1]["groups"] == up


def test_blend_of_split_tags_blends_key_and_value_sources_separately():
    table = swap(_table(anchors=2), "glass elephant", key="elephant", value="glass")
    out = blend(table, "new", "0.5*glass elephant + 0.5*dog")
    dog = table.data[table.row("dog")]
    assert out.is_split("new")
    assert torch.allclose(out.data[out.row("new")], 0.5 * table.data[table.row("elephant")] + 0.5 * dog, atol=1e-6)
    assert torch.allclose(out.value_source("new"), 0.5 * table.data[table.row("glass")] + 0.5 * dog, atol=1e-6)


@pytest.mark.parametrize("mode", ["vector", "kv"])
def test_slerp_endpoints_are_the_two_tags(mode):
    table = _table(mode=mode, anchors=2)
    start = blend(table, "start", "1*cat + 0*dog", slerp=True)
    end = blend(table, "end", "0*cat + 1*dog", slerp=True)
    assert torch.equal(start.data[start.row("start")], table.data[table.row("cat")])
    assert torch.equal(end.data[end.row("end")], table.data[table.row("dog")])


def _two_tag_table(a: torch.Tensor, b: torch.Tensor) -> TagTable:
    """A one-group table whose tags a and b hold the given vectors (same for both anchors)."""
    table = _table(groups="single", anchors=2, tags=["a", "b"])
    table.data[0] = a
    table.data[1] = b
    return table


def test_slerp_follows_the_arc_and_falls_back_to_lerp_when_parallel_or_zero():
    e1, e2 = torch.zeros(16), torch.zeros(16)
    e1[0], e2[1] = 3.0, 3.0
    half = blend(_two_tag_table(e1, e2), "half", "0.5*a + 0.5*b", slerp=True)
    result = half.data[half.row("half")]
    assert torch.allclose(result.norm(dim=-1), torch.full((2,), 3.0))  # equal norms stay on the sphere
    assert torch.allclose(result[0], 3.0 * (e1 + e2) / e1.add(e2).norm())
    third = blend(_two_tag_table(e1, e2), "third", "0.75*a + 0.25*b", slerp=True)
    angle = torch.atan2(third.data[2, 0, 1], third.data[2, 0, 0])
    assert math.isclose(float(angle), math.pi / 8, rel_tol=1e-5)  # a quarter of the way along the 90° arc

    for b in (2.0 * e1, torch.zeros(16)):  # parallel, zero: the arc is undefined, lerp is used
        out = blend(_two_tag_table(e1, b), "mid", "0.5*a + 0.5*b", slerp=True)
        assert torch.allclose(out.data[out.row("mid")][0], 0.5 * e1 + 0.5 * b)


# ----------------------------------------------------------------------------- mix, rename, provenance, purity
def test_mix_takes_a_in_the_selected_groups_and_b_elsewhere():
    table = swap(_table(groups="blocks", anchors=2), "split", key="elephant", value="glass")
    out = mix(table, "new", a="split", b="dog", layers="down.*")
    down = select_groups(table, "down.*")
    mask = torch.zeros(table.width, dtype=torch.bool)
    for g in down:
        mask[table.group_columns(g)] = True
    dog = table.data[table.row("dog")]
    assert torch.equal(out.data[out.row("new")], torch.where(mask, table.data[table.row("elephant")], dog))
    assert torch.equal(out.value_source("new"), torch.where(mask, table.data[table.row("glass")], dog))
    assert out.provenance[-1]["op"] == "mix" and out.provenance[-1]["groups"] == down


def test_rename_keeps_vectors_value_source_and_count():
    table = swap(_table(), "split", key="elephant", value="glass")
    table.counts["split"] = 7
    out = rename(table, "split", "Glass_Elephant")
    assert "split" not in out and out.tags[-1] == "glass elephant"
    assert torch.equal(out.data[-1], table.data[-1])
    assert torch.equal(out.value_source("glass elephant"), table.value_source("split"))
    assert out.counts["glass elephant"] == 7
    assert out.provenance[-1] == {"op": "rename", "inputs": ["split"], "result": "glass elephant", "old": "split",
                                  "new": "glass elephant"}


OPS = {
    "blend": lambda t: blend(t, "new", "0.5*cat + 0.5*glass elephant", layers="mid"),
    "slerp": lambda t: blend(t, "new", "0.5*cat + 0.5*dog", slerp=True),
    "swap": lambda t: swap(t, "new", key="cat", value="dog", layers="up.*", rest="value"),
    "mix": lambda t: mix(t, "new", a="cat", b="glass elephant", layers="0-2"),
    "drop": lambda t: drop(t, ["glass elephant"], match="^d"),
    "rename": lambda t: rename(t, "cat", "kitten"),
    "extract": lambda t: extract(t, ["cat", "glass elephant"]),
    "combine": lambda t: combine(t, extract(t, ["dog"])),
    "overwrite": lambda t: blend(t, "cat", "0.5*cat + 0.5*dog", overwrite=True),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_returns_a_new_table_and_leaves_its_input_untouched(op):
    table = swap(_table(anchors=2), "glass elephant", key="elephant", value="glass")
    before = _snapshot(table)
    out = OPS[op](table)
    assert out is not table and out.data is not table.data
    assert _same_snapshot(_snapshot(table), before)
    # earlier entries are carried over (drop scrubs the dropped names from them) and one entry is added
    assert len(out.provenance) == len(table.provenance) + 1
    assert out.provenance[:-1] == table.provenance or op == "drop"
    assert out.provenance[-1]["op"] == {"slerp": "blend", "overwrite": "blend"}.get(op, op)


def test_overwriting_a_tag_resets_its_count_and_keeps_its_row():
    table = _table()
    out = blend(table, "cat", "0.5*cat + 0.5*dog", overwrite=True)
    assert out.tags == table.tags and out.counts["cat"] == 0
    assert torch.allclose(out.data[out.row("cat")], 0.5 * table.data[2] + 0.5 * table.data[3], atol=1e-6)


# ----------------------------------------------------------------------------- layer specs and weights
@pytest.mark.parametrize("groups, spec, expected", [
    ("layers", None, [0, 1, 2, 3, 4, 5, 6]),
    ("layers", "0-3", [0, 1, 2, 3]),
    ("layers", "5", [5]),
    ("layers", "down.*", [0, 1]),
    ("layers", "mid", [2]),
    ("layers", "up.1.*", [3, 4]),
    ("layers", "up.1", [3, 4]),
    ("layers", "up", [3, 4, 5, 6]),
    ("layers", "IN01", [0]),
    ("layers", "out0*", [3, 4, 5, 6]),
    ("layers", "IN01-IN05", [0, 1]),
    ("layers", "M00-OUT03", [2, 3, 4]),
    ("layers", "down_blocks.1", [1]),
    ("layers", "mid_block.attentions.0.transformer_blocks.0.attn2", [2]),
    ("layers", "mid, 0, up.2.1", [0, 2, 6]),
    ("layers", ["mid", 0], [0, 2]),
    ("blocks", "up.1.*", [3]),
    ("blocks", "up_blocks.1", [3]),
    ("blocks", "OUT04-OUT05", [4]),
    ("blocks", "up.1.0, up.1.1", [3]),
    ("single", "all", [0]),
    ("single", "*", [0]),
    ({"coarse": ["down.*", "mid.0"], "fine": ["up.*"]}, "coarse", [0]),
    ({"coarse": ["down.*", "mid.0"], "fine": ["up.*"]}, "up.*", [1]),
])
def test_select_groups(groups, spec, expected):
    assert select_groups(_table(groups=groups), spec) == expected


def test_select_groups_kv_mode_has_one_group_per_layer():
    assert select_groups(_table(mode="kv"), "up.2") == [5, 6]


@pytest.mark.parametrize("groups, spec, message", [
    ("layers", "nothing", "layer spec item 'nothing' matches no group or layer; groups: 0 down.0.0"),
    ("layers", "mid, nothing", "'nothing' matches no group or layer"),
    ("layers", "7", "group index 7 is out of range, this table has groups 0-6"),
    ("layers", "3-1", "range '3-1' runs backwards"),
    ("layers", "OUT05-IN01", "runs backwards; kohya order"),
    ("layers", "", "empty layer spec"),
    ("layers", "mid,,up", "has an empty item"),
    ("blocks", "up.1.0", "selects only some layers of group 3 'up_blocks.1' (up.1.0; not up.1.1)"),
    ("blocks", "OUT02", "a group is the unit of editing"),
    ("single", "mid", "selects only some layers of group 0 'all'"),
])
def test_select_groups_errors(groups, spec, message):
    with pytest.raises(CondvecError) as err:
        select_groups(_table(groups=groups), spec)
    assert message in str(err.value)


def test_select_groups_kohya_needs_kohya_names():
    table = table_for_unet(make_unet(layers_per_block=1), tags=["a"])
    table.layers = [type(layer)(**{**layer.to_dict(), "kohya": None}) for layer in table.layers]
    with pytest.raises(CondvecError, match="have no kohya names"):
        select_groups(table, "IN01-IN05")


@pytest.mark.parametrize("expression, terms", [
    ("0.6*cat + 0.4*dog", [("cat", 0.6), ("dog", 0.4)]),
    ("cat - 0.5*dog", [("cat", 1.0), ("dog", -0.5)]),
    ("dog*0.3+cat*0.7", [("dog", 0.3), ("cat", 0.7)]),
    ("-cat + -2*dog", [("cat", -1.0), ("dog", -2.0)]),
    ("t-shirt + 1e-3*long hair", [("t-shirt", 1.0), ("long hair", 0.001)]),
    ("1.5e+2 * ganyu (genshin impact)", [("ganyu (genshin impact)", 150.0)]),
])
def test_parse_weights(expression, terms):
    assert parse_weights(expression) == terms


@pytest.mark.parametrize("expression, message", [
    ("", "empty weight expression"),
    ("cat +", "ends with an operator"),
    ("cat + + dog", "empty term between two operators"),
    ("0.5", "is a number without a tag"),
    ("0.5*", "must be WEIGHT*TAG"),
    ("cat*dog", "must be WEIGHT*TAG"),
    ("0.6*cat-0.4*dog", "more than one '*'"),
    ("1e999*cat", "is not a finite number"),
])
def test_parse_weights_errors(expression, message):
    with pytest.raises(CondvecError) as err:
        parse_weights(expression)
    assert message in str(err.value)


@pytest.mark.parametrize("call, message", [
    (lambda t: blend(t, "new", "0.5*cat + 0.5*dgo"), "unknown tag 'dgo' (did you mean 'dog'?)"),
    (lambda t: blend(t, "new", "0.5*cat + 0.5*Cat"), "'cat' appears more than once"),
    (lambda t: blend(t, "dog", "0.5*cat + 0.5*glass"), "tag 'dog' already exists"),
    (lambda t: blend(t, "new", "0.5*cat + 0.6*dog", slerp=True), "slerp weights must sum to 1"),
    (lambda t: blend(t, "new", "0.5*cat + 0.3*dog + 0.2*glass", slerp=True), "exactly two tags, got 3"),
    (lambda t: blend(t, "new", [("cat", float("nan"))]), "not a finite number"),
    (lambda t: blend(t, "new", []), "at least one"),
    (lambda t: blend(t, "new", "cat", layers="nope"), "'nope' matches no group or layer"),
    (lambda t: swap(t, "new", key="elefant", value="glass"), "unknown tag 'elefant' (did you mean 'elephant'?)"),
    (lambda t: swap(t, "new", key="cat", value="dog", rest="both"), "rest must be one of key, value, tied"),
    (lambda t: swap(t, "", key="cat", value="dog"), "must not be empty"),
    (lambda t: mix(t, "new", a="cat", b="dog", layers=None), "mix needs a layer spec"),
    (lambda t: drop(t), "nothing to drop"),
    (lambda t: drop(t, ["kat"]), "unknown tag 'kat'"),
    (lambda t: drop(t, match="["), "is not a valid regular expression"),
    (lambda t: drop(t, match="^z"), "matches no tag"),
    (lambda t: rename(t, "cat", "dog"), "tag 'dog' already exists"),
    (lambda t: rename(t, "cat", "CAT"), "are the same tag after normalisation"),
    (lambda t: extract(t, []), "at least one tag"),
    (lambda t: extract(t, ["cat", "mouse"]), "unknown tag 'mouse'"),
    (lambda t: combine(t, t, on_conflict="max"), "on_conflict must be one of"),
])
def test_errors(call, message):
    with pytest.raises(CondvecError) as err:
        call(_table())
    assert message in str(err.value)


def test_swap_rest_tied_is_refused_in_kv_mode():
    with pytest.raises(CondvecError, match="exists only in vector mode"):
        swap(_table(mode="kv"), "new", key="cat", value="dog", layers="mid", rest="tied")


# ----------------------------------------------------------------------------- drop, extract, combine
def _file_has(path, tensor: torch.Tensor) -> bool:
    return tensor.detach().float().contiguous().numpy().tobytes() in path.read_bytes()


def test_drop_leaves_no_trace_of_the_dropped_vectors_in_the_file(tmp_path):
    table = swap(_table(anchors=2, tags=["cat", "dog", "secret one", "secret two", "keep"]), "secret split",
                 key="secret one", value="secret two", layers="mid")
    table.counts["secret split"] = 3
    before, after = tmp_path / "before.safetensors", tmp_path / "after.safetensors"
    table.save(before)
    dropped = ["secret one", "secret two", "secret split"]
    traces = [table.data[table.row(n)] for n in dropped] + [table.values["secret split"]]
    traces += [row[a] for row in traces for a in range(table.num_anchors)]  # each anchor's vector on its own too
    assert all(_file_has(before, trace) for trace in traces)  # the search finds them when they are there

    out = drop(table, ["secret one"], match="^secret (two|split)$")
    out.save(after)
    assert not any(_file_has(after, trace) for trace in traces)
    assert out.tags == ["cat", "dog", "keep"] and out.values == {}
    assert set(out.counts) == {"cat", "dog", "keep"}
    assert b"secret" not in after.read_bytes()  # names are gone from tags, counts, split list and provenance
    assert out.provenance[-1] == {"op": "drop", "count": 3}
    assert out.provenance[0]["inputs"] == ["<dropped>", "<dropped>"] and out.provenance[0]["result"] == "<dropped>"
    loaded = TagTable.load(after)
    assert torch.equal(loaded.data, torch.stack([table.data[table.row(n)] for n in ("cat", "dog", "keep")]))


def test_extract_then_combine_round_trips_tensors_and_metadata(tmp_path):
    table = swap(_table(anchors=2, tags=["a", "b", "c", "d"]), "split", key="a", value="b")
    table.counts["split"] = 4
    left, right = extract(table, ["b", "a"]), extract(table, ["split", "c", "d"])
    assert left.tags == ["a", "b"] and right.tags == ["c", "d", "split"]
    shipped = []
    for name, part in (("left", left), ("right", right)):  # each part goes through a file, as a shipped concept
        part.save(tmp_path / f"{name}.safetensors")
        shipped.append(TagTable.load(tmp_path / f"{name}.safetensors"))
        assert shipped[-1].metadata() == part.metadata()
    merged = combine(*shipped)
    assert merged.tags == table.tags
    assert torch.equal(merged.data, table.data) and torch.equal(merged.special, table.special)
    assert merged.values.keys() == table.values.keys() == {"split"}
    assert torch.equal(merged.values["split"], table.values["split"])
    meta, original = merged.metadata(), table.metadata()
    assert meta.pop("provenance")[-1]["op"] == "combine"
    original.pop("provenance")
    assert meta == original


def test_extract_and_combine_through_files(tmp_path):
    table = _table(anchors=2)
    for name, tags in (("left", ["cat", "dog"]), ("right", ["elephant", "glass"])):
        extract(table, tags).save(tmp_path / f"{name}.safetensors")
    merged = combine(TagTable.load(tmp_path / "left.safetensors"), TagTable.load(tmp_path / "right.safetensors"))
    assert merged.tags == ["cat", "dog", "elephant", "glass"]
    for name in merged.tags:
        assert torch.equal(merged.data[merged.row(name)], table.data[table.row(name)])
        assert merged.counts[name] == table.counts[name]


def _conflicting_pair():
    left = _table(anchors=2, seed=0, tags=["cat", "dog"])
    right = _table(anchors=2, seed=5, tags=["cat", "bird"])
    right.special = left.special.clone()
    right = swap(right, "dog", key="cat", value="bird")  # a split tag named like left's tied "dog"
    right.counts["dog"] = 2
    return left, right


@pytest.mark.parametrize("mode", ["left", "right", "mean"])
def test_combine_conflict_modes(mode):
    left, right = _conflicting_pair()
    out = combine(left, right, on_conflict=mode)
    assert out.tags == ["cat", "dog", "bird"]
    assert torch.equal(out.data[2], right.data[right.row("bird")]) and out.counts["bird"] == right.counts["bird"]
    for name in ("cat", "dog"):
        l_key, r_key = left.data[left.row(name)], right.data[right.row(name)]
        l_val, r_val = left.value_source(name), right.value_source(name)
        key, value = out.data[out.row(name)], out.value_source(name)
        if mode == "left":
            assert torch.equal(key, l_key) and torch.equal(value, l_val)
            assert out.counts[name] == left.counts[name]
        elif mode == "right":
            assert torch.equal(key, r_key) and torch.equal(value, r_val)
            assert out.counts[name] == right.counts[name]
        else:
            assert torch.allclose(key, (l_key + r_key) / 2) and torch.allclose(value, (l_val + r_val) / 2)
            assert out.counts[name] == left.counts[name] + right.counts[name]
    assert out.is_split("dog") == (mode != "left")
    assert out.provenance[-1]["conflicts"] == ["cat", "dog"] and out.provenance[-1]["on_conflict"] == mode


def test_combine_conflicts_error_by_default_listing_them():
    left, right = _conflicting_pair()
    with pytest.raises(CondvecError) as err:
        combine(left, right)
    assert "2 tags with different vectors in both tables: 'cat', 'dog'" in str(err.value)


def test_combine_identical_tags_are_not_conflicts_but_different_special_rows_are():
    table = _table()
    assert combine(table, extract(table, ["cat"])).tags == table.tags
    other = table.copy()
    other.special += 1
    with pytest.raises(CondvecError, match="different sink/padding rows"):
        combine(table, other)
    assert torch.equal(combine(table, other, on_conflict="right").special, other.special)


@pytest.mark.parametrize("other, message", [
    (lambda: _table(mode="kv"), "mode vector vs kv"),
    (lambda: _table(groups="blocks"), "layer groups 7 (layers) vs 5 (blocks)"),
    (lambda: _table(anchors=2), "timestep anchors [0.0] vs [0.0, 999.0]"),
    (lambda: table_for_unet(make_unet(cross_attention_dim=8), tags=["x"], base_name="tiny"), "cross_dim"),
    (lambda: _table(pad_to=77), "pad_to None vs 77"),
    (lambda: _table(use_sink=False), "use_sink True vs False"),
    (lambda: table_for_unet(make_unet(), tags=["x"], base_name="other"), "base model name 'tiny' vs 'other'"),
])
def test_combine_refuses_tables_of_another_layout_saying_what_differs(other, message):
    with pytest.raises(CondvecError) as err:
        combine(_table(), other())
    assert "not built for the same base and layout" in str(err.value) and message in str(err.value)


def test_combine_refuses_other_normalisation():
    from conditioner import TagNormalization

    with pytest.raises(CondvecError, match="tag normalisation"):
        combine(_table(), _table(normalization=TagNormalization(lowercase=False)))
