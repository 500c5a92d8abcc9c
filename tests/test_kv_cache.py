"""Constant conditioning: K and V projected once per call give the same outputs as recomputing them."""

import torch
from testkit import make_unet

from conditioner import TagTable, encode
from unet_patch import TagDiffusionPipeline, discover, patched
from unet_patch.processor import cached_kv


def _table(unet, **kwargs):
    return TagTable.create(discover(unet), tags=["red", "blue"], init_std=1.0, pad_to=8, **kwargs)


def _count_projections(unet):
    calls = []
    for layer in discover(unet):
        unet.get_submodule(layer.name).to_k.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_cached_kv_equals_recomputing_and_projects_once():
    unet = make_unet()
    table = _table(unet, groups="blocks")
    cond = encode(table, ["", "red, (blue:1.3)"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = _count_projections(unet)
    with torch.no_grad(), patched(unet, table):
        plain = [unet(x, t, encoder_hidden_states=cond).sample for t in (900, 500, 100)]
        assert len(calls) == 3 * len(table.layers)
        calls.clear()
        with cached_kv(unet):
            cached = [unet(x, t, encoder_hidden_states=cond).sample for t in (900, 500, 100)]
        assert len(calls) == len(table.layers)  # once per layer for the whole call
    for a, b in zip(plain, cached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_is_invalidated_by_a_new_or_modified_tensor_and_by_table_edits():
    unet = make_unet()
    table = _table(unet)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), patched(unet, table), cached_kv(unet):
        cond = encode(table, ["red"])
        first = unet(x, 10, encoder_hidden_states=cond).sample
        cond.mul_(2)  # in-place edit of the same tensor: version changes
        edited = unet(x, 10, encoder_hidden_states=cond).sample
        fresh = unet(x, 10, encoder_hidden_states=encode(table, ["blue"])).sample
    with torch.no_grad(), patched(unet, table):
        torch.testing.assert_close(edited, unet(x, 10, encoder_hidden_states=cond).sample, rtol=0, atol=0)
        torch.testing.assert_close(fresh, unet(x, 10, encoder_hidden_states=encode(table, ["blue"])).sample,
                                   rtol=0, atol=0)
    assert not torch.equal(first, edited)

    pipe = TagDiffusionPipeline(unet=unet, scheduler=__import__("diffusers").DDIMScheduler(), vae=None, table=table)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("red", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))  # noqa: E731
    before = run().images
    table.data[table.row("red")] += 1.0  # a table edit between calls is read by the next call
    after = run().images
    assert not torch.equal(before, after)
    for processor in unet.attn_processors.values():
        assert getattr(processor, "cache", None) is None  # nothing is kept after a call
