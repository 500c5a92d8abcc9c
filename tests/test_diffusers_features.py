"""condvec next to diffusers' own features: attention slicing, IP-Adapter, fused QKV, set_default_attn_processor.
Each one works with a per-layer table or is refused in one line — never a silent drop."""

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from testkit import make_unet

from conditioner import TagTable, encode
from conditioner.errors import CondvecError
from unet_patch import discover, install, is_installed, remove


@pytest.fixture
def setup():
    unet = make_unet()
    table = TagTable.create(discover(unet), tags=["red", "blue"], groups="layers", init_std=1.0, pad_to=6)
    cond = encode(table, ["red, (blue:1.5)", ""])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return unet, table, cond, x


def _run(unet, x, cond, **kwargs):
    with torch.no_grad():
        return unet(x, 100, encoder_hidden_states=cond, **kwargs).sample


def test_attention_slicing_after_install_is_refused_then_works_when_installed_again(setup):
    unet, table, cond, x = setup
    install(unet, table)
    want = _run(unet, x, cond)
    unet.set_attention_slice(1)
    assert not is_installed(unet)
    with pytest.raises(CondvecError, match="attention slicing: call unet_patch.install"):
        _run(unet, x, cond)
    install(unet, table)  # takes over the slice size
    assert is_installed(unet)
    procs = [unet.get_submodule(layer.name).processor for layer in discover(unet)]
    assert all(p.slice_size == 1 for p in procs)
    torch.testing.assert_close(_run(unet, x, cond), want, rtol=1e-5, atol=1e-6)


def test_fused_qkv_is_refused_in_one_line(setup):
    unet, table, cond, x = setup
    install(unet, table)
    unet.fuse_qkv_projections()
    with pytest.raises(CondvecError, match="unfuse_qkv_projections"):
        _run(unet, x, cond)
    with pytest.raises(CondvecError, match="unfuse_qkv_projections"):
        install(unet, table)
    unet.unfuse_qkv_projections()
    install(unet, table)
    assert is_installed(unet)
    _run(unet, x, cond)


def test_set_default_attn_processor_after_install_gives_a_clear_message_and_remove_recovers(setup):
    unet, table, cond, x = setup
    before = dict(unet.attn_processors)
    install(unet, table)
    with pytest.raises(CondvecError, match="remove\\(unet\\) first"):
        unet.set_default_attn_processor()
    assert is_installed(unet)
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())  # the same replacement by hand: the next forward says what happened
    assert not is_installed(unet)
    with pytest.raises(CondvecError, match="remove\\(unet\\)"):
        _run(unet, x, cond)
    with pytest.warns(UserWarning):
        remove(unet)
    unet.set_attn_processor(before)
    unet.set_default_attn_processor()  # after remove, diffusers' own method works again
    _run(unet, x, encode(TagTable.create(discover(unet), tags=["red"], groups="single", pad_to=6), ["red", ""]))


def _load_ip_adapter(unet, image_dim=12, tokens=4, seed=1):
    """A tiny IP-Adapter loaded the way diffusers' loader does: image projection + per-layer to_k_ip / to_v_ip."""
    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    unet.encoder_hid_proj = __import__("diffusers").models.embeddings.MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=cross, image_embed_dim=image_dim, num_image_text_embeds=tokens)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            ip = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=cross, scale=0.7,
                                           num_tokens=(tokens,))
            for lin in list(ip.to_k_ip) + list(ip.to_v_ip):
                torch.nn.init.normal_(lin.weight, std=0.5)
            procs[name] = ip
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)


def test_ip_adapter_next_to_a_per_layer_table(setup):
    unet, table, cond, x = setup
    single = TagTable.create(discover(unet), tags=["red", "blue"], groups="single", init_std=1.0, pad_to=6)
    plain = encode(single, ["red, blue", ""])
    image_embeds = [torch.randn(2, 1, 12, generator=torch.Generator().manual_seed(2))]
    _load_ip_adapter(unet)
    stock = _run(unet, x, plain, added_cond_kwargs={"image_embeds": image_embeds})
    install(unet, single)  # single group, no weights: condvec + image attention == diffusers' IP-Adapter
    torch.testing.assert_close(_run(unet, x, plain, added_cond_kwargs={"image_embeds": image_embeds}), stock,
                               rtol=1e-5, atol=1e-6)
    install(unet, table)  # per-layer table: runs, and the image prompt changes the output
    with_image = _run(unet, x, cond, added_cond_kwargs={"image_embeds": image_embeds})
    without = _run(unet, x, cond, added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, 12)]})
    assert not torch.allclose(with_image, without)
    remove(unet)  # back to the IP-Adapter's own processors
    assert all(isinstance(unet.get_submodule(layer.name).processor, IPAdapterAttnProcessor2_0)
               for layer in discover(unet))


def test_ip_adapter_loaded_after_install_is_refused_in_one_line(setup):
    unet, table, cond, x = setup
    install(unet, table)
    _load_ip_adapter(unet)
    with pytest.raises(CondvecError, match="load_ip_adapter"):
        _run(unet, x, cond, added_cond_kwargs={"image_embeds": [torch.randn(2, 1, 12)]})


def test_processors_replaced_after_install_run_plain_conditioning_and_refuse_packed(setup):
    """The user's own processors (attention slicing, set_attn_processor) just run conditioning they can read; only
    condvec-packed conditioning they would misread (per-layer groups, bias channel) is refused in one line."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, table, cond, x = setup
    single = TagTable.create(discover(unet), tags=["red", "blue"], groups="single", init_std=1.0, pad_to=6)
    plain = encode(single, ["red, blue", ""])  # no weights: exactly cross_attention_dim wide
    assert plain.shape[-1] == unet.config.cross_attention_dim
    stock = _run(unet, x, plain)  # the unpatched UNet on that sequence
    install(unet, table)
    unet.set_attn_processor(AttnProcessor())  # on purpose, after install
    assert not is_installed(unet)
    torch.testing.assert_close(_run(unet, x, plain), stock, rtol=1e-5, atol=1e-6)
    with pytest.raises(CondvecError, match="cannot read this packed conditioning"):
        _run(unet, x, cond)
    unet.set_attention_slice(1)
    torch.testing.assert_close(_run(unet, x, plain), stock, rtol=1e-5, atol=1e-6)
    with pytest.raises(CondvecError, match="attention slicing: call unet_patch.install"):
        _run(unet, x, cond)
