"""Shared test helpers (importable: ``from testkit import make_unet``); fixtures live in ``conftest.py``."""

import torch
from diffusers import UNet2DConditionModel


def make_unet(in_channels: int = 3, cross_attention_dim: int = 16, sample_size: int = 8, seed: int = 0,
              layers_per_block: int = 1) -> UNet2DConditionModel:
    """A tiny SD-shaped UNet: cross-attention in two down blocks, the mid block and two up blocks."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16, 16),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def capture_kv_inputs(unet):
    """Forward hooks on every attn2's to_k / to_v, recording their inputs by (layer name, projection)."""
    from unet_patch import discover

    seen, handles = {}, []
    for layer in discover(unet):
        attn = unet.get_submodule(layer.name)
        for proj in ("to_k", "to_v"):
            def hook(module, args, out, key=(layer.name, proj)):
                seen[key] = args[0].detach().clone()
            handles.append(getattr(attn, proj).register_forward_hook(hook))
    return seen, handles
