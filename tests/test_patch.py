import math

import pytest
import torch
from testkit import capture_kv_inputs, make_unet

from conditioner import TableMismatchError, encode
from conditioner.errors import CondvecError
from unet_patch import discover, install, is_installed, patched, remove, table_for_unet

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _run(unet, cond, t=10):
    with torch.no_grad():
        return unet(X[: cond.shape[0]], t, encoder_hidden_states=cond).sample


@pytest.mark.parametrize("groups", ["single", "blocks", "layers"])
def test_same_sequence_in_every_group_equals_stock_unet(groups):
    """Invariant 1: bit-identical to the stock UNet."""
    unet = make_unet()
    table = table_for_unet(unet, groups=groups)
    seq = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    reference = _run(unet, seq)
    with patched(unet, table):
        out = _run(unet, seq.repeat(1, 1, len(table.group_names)))
    assert torch.equal(out, reference)


def test_remove_restores_processors_state_and_outputs_exactly():
    """Invariant 2."""
    unet = make_unet()
    before = dict(unet.attn_processors)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    seq = torch.randn(2, 4, 16)
    reference = _run(unet, seq)
    table = table_for_unet(unet, tags=["a"], init_std=1.0)
    install(unet, table)
    assert is_installed(unet)
    patched_out = _run(unet, encode(table, ["a", "a"]))
    install(unet, table)  # re-install keeps the true originals
    remove(unet)
    after = unet.attn_processors
    assert not is_installed(unet)
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert torch.equal(_run(unet, seq), reference)
    assert not torch.equal(patched_out, reference[:2])


def test_context_manager_restores_on_error():
    unet = make_unet()
    before = dict(unet.attn_processors)
    table = table_for_unet(unet)
    with pytest.raises(RuntimeError), patched(unet, table):
        raise RuntimeError("boom")
    assert all(before[k] is v for k, v in unet.attn_processors.items())


def test_groups_are_local_changing_one_group_changes_only_its_layers():
    unet = make_unet()
    table = table_for_unet(unet, tags=["a"], groups="blocks", init_std=1.0)
    seen, handles = capture_kv_inputs(unet)
    with patched(unet, table):
        base_out = _run(unet, encode(table, ["a"]))
        base_seen = dict(seen)
        g = table.group_names.index("up_blocks.1")
        table.data[0, :, table.group_columns(g)] += 1.0
        out = _run(unet, encode(table, ["a"]))
    for h in handles:
        h.remove()
    assert not torch.equal(out, base_out)
    for li, layer in enumerate(table.layers):
        changed = not torch.equal(seen[(layer.name, "to_k")], base_seen[(layer.name, "to_k")])
        assert changed == (table.layer_group[li] == g), layer.name


def test_split_tag_feeds_key_source_to_to_k_and_value_source_to_to_v():
    """Invariant 4 at table level: each layer's to_k sees key sources, to_v value sources."""
    unet = make_unet()
    table = table_for_unet(unet, tags=["elephant", "glass"], groups="layers", init_std=1.0)
    table.add_tags(["glass elephant"], init="tag:elephant")
    table.set_value_source("glass elephant", table.data[table.row("glass")].clone())
    seen, handles = capture_kv_inputs(unet)
    with patched(unet, table):
        _run(unet, encode(table, ["glass elephant"])[:1])
    for h in handles:
        h.remove()
    for li, layer in enumerate(table.layers):
        cols = table.group_columns(table.layer_group[li])
        assert torch.equal(seen[(layer.name, "to_k")][0, 1], table.data[table.row("elephant"), 0, cols])
        assert torch.equal(seen[(layer.name, "to_v")][0, 1], table.data[table.row("glass"), 0, cols])


def test_tag_order_does_not_matter():
    """Invariant 5."""
    unet = make_unet()
    table = table_for_unet(unet, tags=["a", "b", "c", "d"], init_std=1.0, groups="blocks")
    with patched(unet, table):
        one = _run(unet, encode(table, ["a, b, (c:1.5), d"]))
        two = _run(unet, encode(table, ["d, (c:1.5), a, b"]))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    assert not torch.equal(one, _run(make_unet(), torch.zeros(1, 3, 16)))


def test_weight_two_equals_repeating_the_token():
    """Tag weights are an additive log(weight) bias on attention logits."""
    unet = make_unet()
    table = table_for_unet(unet, tags=["a", "a copy", "b"], init_std=1.0)
    table.data[1] = table.data[0]
    with patched(unet, table):
        weighted = _run(unet, encode(table, ["(a:2), b"]))
        repeated = _run(unet, encode(table, ["a, a copy, b"]))
        plain = _run(unet, encode(table, ["a, b"]))
    torch.testing.assert_close(weighted, repeated, rtol=1e-5, atol=1e-6)
    assert (weighted - plain).abs().max() > 1e-4


def test_padding_is_masked_in_dynamic_length():
    unet = make_unet()
    table = table_for_unet(unet, tags=["a", "b", "c"], init_std=1.0)
    with patched(unet, table):
        batch = _run(unet, encode(table, ["a", "a, b, c"]))  # first sequence padded and masked
        alone = _run(unet, encode(table, ["a"]))
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-6)


def test_kv_mode_matches_hand_computation():
    unet = make_unet()
    table = table_for_unet(unet, tags=["a"], mode="kv", anchors=2, init_std=1.0)
    layer = table.layers[2]  # mid block
    attn = unet.get_submodule(layer.name)
    captured = {}
    attn.register_forward_hook(lambda m, args, kwargs, out: captured.update(h=args[0], out=out), with_kwargs=True)
    t = 600.0
    with patched(unet, table):
        _run(unet, encode(table, ["a"], timesteps=t), t=t)
    sl = table.layer_slices()[layer.name]
    w = t / 999.0
    rows = torch.stack([table.special[0], table.data[0]])  # sink, a: (2, A, W)
    interp = (1 - w) * rows[:, 0] + w * rows[:, 1]
    k, v = interp[:, sl.key_start:sl.key_end], interp[:, sl.value_start:sl.value_start + layer.inner_dim]
    h = captured["h"][0]  # (Q, C)
    q = attn.to_q(h)
    d = layer.inner_dim // layer.heads
    qh, kh, vh = (x.view(-1, layer.heads, d).transpose(0, 1) for x in (q, k, v))
    attn_w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
    expected = attn.to_out[0]((attn_w @ vh).transpose(0, 1).reshape(-1, layer.inner_dim))
    torch.testing.assert_close(captured["out"][0], expected, rtol=1e-4, atol=1e-5)


def test_plain_tensor_for_single_group_fixed_length_works_unpatched():
    unet = make_unet()
    table = table_for_unet(unet, tags=["a", "b"], groups="single", pad_to=8, init_std=1.0)
    cond = encode(table, ["a, b", ""])
    assert cond.shape == (2, 8, 16)
    stock = _run(unet, cond)
    with patched(unet, table):
        assert torch.equal(_run(unet, cond), stock)


def test_mismatched_table_is_refused_with_what_differs():
    table = table_for_unet(make_unet(cross_attention_dim=16), base_name="small")
    other = make_unet(cross_attention_dim=32)
    before = dict(other.attn_processors)
    with pytest.raises(TableMismatchError, match="built for small.*cross_dim=16, UNet cross_dim=32"):
        install(other, table)
    assert all(before[k] is v for k, v in other.attn_processors.items()), "a refused install changes nothing"
    deeper = make_unet(layers_per_block=2)
    with pytest.raises(TableMismatchError, match="UNet layer\\(s\\) not in the table"):
        install(deeper, table)


def test_wrong_width_conditioning_is_a_clear_error():
    unet = make_unet()
    table = table_for_unet(unet, groups="blocks")
    with patched(unet, table), pytest.raises(CondvecError, match="packed conditioning has width 16"):
        _run(unet, torch.zeros(1, 3, 16))


def test_sd15_layout_names():
    """An SD1.5-shaped UNet (tiny widths, real block structure) gives 16 layers, 7 blocks, kohya names."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, sample_size=8,
    )
    layers = discover(unet)
    assert len(layers) == 16 and len({layer.block for layer in layers}) == 7
    assert [layer.kohya for layer in layers] == [
        "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
        "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
    ]


def _attn2(unet):
    return {layer.name: unet.get_submodule(layer.name) for layer in discover(unet)}


def test_remove_never_restores_stale_processors_after_set_attn_processor():
    """Processors set after install survive remove(); the unpatched output is theirs, bit for bit."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet()
    table = table_for_unet(unet)
    original = dict(unet.attn_processors)
    install(unet, table)
    unet.set_attn_processor(AttnProcessor())  # someone swaps every processor after install
    mine = dict(unet.attn_processors)
    assert not is_installed(unet)
    with pytest.warns(UserWarning, match="got another processor after install"):
        remove(unet)
    after = unet.attn_processors
    assert all(after[k] is mine[k] for k in after) and not any(after[k] is original[k] for k in after)
    assert all("_condvec_original_processor" not in attn.__dict__ for attn in _attn2(unet).values())


def test_install_after_a_replacement_keeps_the_new_processor_as_original():
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet()
    table = table_for_unet(unet)
    install(unet, table)
    unet.set_attn_processor(AttnProcessor())
    mine = dict(unet.attn_processors)
    install(unet, table)
    assert is_installed(unet)
    remove(unet)
    assert all(unet.attn_processors[k] is v for k, v in mine.items())


def test_one_replaced_layer_keeps_its_processor_the_others_are_restored_exactly():
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet()
    seq = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3))
    reference = _run(unet, seq)
    before = dict(unet.attn_processors)
    table = table_for_unet(unet)
    install(unet, table)
    name = next(iter(_attn2(unet)))
    replacement = AttnProcessor()
    _attn2(unet)[name].set_processor(replacement)
    assert not is_installed(unet), "is_installed is true only while every attn2 runs condvec"
    with pytest.warns(UserWarning, match=name):
        remove(unet)
    after = unet.attn_processors
    assert after[f"{name}.processor"] is replacement
    assert all(after[k] is v for k, v in before.items() if k != f"{name}.processor")
    # AttnProcessor computes what the default processor does (to rounding): the UNet is unpatched
    torch.testing.assert_close(_run(unet, seq), reference, rtol=1e-5, atol=1e-6)


def test_originals_live_on_the_attention_modules_outside_the_state_dict():
    unet = make_unet()
    keys = list(unet.state_dict())
    before = {name: attn.processor for name, attn in _attn2(unet).items()}
    with patched(unet, table_for_unet(unet)):
        assert list(unet.state_dict()) == keys
        assert all(attn.__dict__["_condvec_original_processor"] is before[name]
                   for name, attn in _attn2(unet).items())
        assert "_condvec_original_processors" not in unet.__dict__


def test_nested_patched_restores_the_outer_table_then_the_originals():
    unet = make_unet()
    before = dict(unet.attn_processors)
    outer_table, inner_table = table_for_unet(unet, groups="single"), table_for_unet(unet, groups="layers")
    with patched(unet, outer_table):
        outer = dict(unet.attn_processors)
        with patched(unet, inner_table):
            assert all(unet.attn_processors[k] is not outer[k] for k in outer if "attn2" in k)
        assert all(unet.attn_processors[k] is v for k, v in outer.items())
        assert is_installed(unet)
    assert all(unet.attn_processors[k] is v for k, v in before.items()) and not is_installed(unet)
