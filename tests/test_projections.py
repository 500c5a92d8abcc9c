"""unet_patch.projections: which projections a table bypasses, and special rows converted between layouts."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from conditioner.encode import encode
from unet_patch import discover, table_for_unet
from unet_patch.patch import patched
from unet_patch.projections import bypassed_parameters, kv_projections, special_rows_from

ROOT = Path(__file__).resolve().parents[1]


def _unet(norm_cross: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    if norm_cross:  # a layer norm on the cross-attention inputs (diffusers' cross_attention_norm="layer_norm")
        for layer in discover(unet):
            attn = unet.get_submodule(layer.name)
            attn.norm_cross = torch.nn.LayerNorm(16)
            torch.nn.init.normal_(attn.norm_cross.weight)
            torch.nn.init.normal_(attn.norm_cross.bias)
    return unet


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("anchors", [1, 3])
def test_kv_table_from_a_vector_base_gives_the_same_null_prompt(norm, anchors):
    """The null prompt (sink + padding) reads the same K and V through the converted kv table as through the base."""
    unet = _unet(norm)
    base = table_for_unet(unet, mode="vector", anchors=anchors, pad_to=4, seed=1)
    base.special = torch.randn_like(base.special) * (1 + torch.arange(base.special.shape[0]))[:, None, None]
    kv = table_for_unet(unet, mode="kv", anchors=anchors, pad_to=4, seed=2)
    kv.special = special_rows_from(base, kv, unet)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([999, 0])  # at anchors: norm_cross is not linear between them
    with torch.no_grad():
        with patched(unet, base):
            want = unet(x, t, encoder_hidden_states=encode(base, ["", ""], t.float())).sample
        with patched(unet, kv):
            got = unet(x, t, encoder_hidden_states=encode(kv, ["", ""], t.float())).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vector_to_vector_averages_each_group_and_kv_base_is_not_converted():
    unet = _unet(False)
    base = table_for_unet(unet, mode="vector", groups="layers", seed=1)
    single = table_for_unet(unet, mode="vector", groups="single", seed=2)
    converted = special_rows_from(base, single, unet)  # (S, 1, D): the mean over the layers
    columns = [base.special[:, :, base.group_columns(g)] for g in range(len(base.group_names))]
    torch.testing.assert_close(converted, torch.stack(columns).mean(0))
    assert special_rows_from(table_for_unet(unet, mode="kv"), single, unet) is None


def test_bypassed_parameters_are_the_kv_projections_of_kv_tables_only():
    unet = _unet(False)
    vector, kv = table_for_unet(unet, mode="vector"), table_for_unet(unet, mode="kv")
    assert bypassed_parameters(unet, vector) == []
    projections = kv_projections(unet, kv)
    assert len(projections) == 2 * len(kv.layers)
    for layer, (key, value) in zip(kv.layers, zip(projections[::2], projections[1::2])):
        attn = unet.get_submodule(layer.name)
        assert key is attn.to_k and value is attn.to_v
    assert {id(p) for p in bypassed_parameters(unet, kv)} == {id(p) for m in projections for p in m.parameters()}


def test_train_package_knows_nothing_of_attention_projections():
    """Attention knowledge lives in unet_patch/: train/ never names the key/value projection modules."""
    offenders = [f"{path.name}:{n}" for path in sorted((ROOT / "train").glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "to_k" in line or "to_v" in line]
    assert offenders == []
