"""What a table does to the attn2 key/value projections: which it bypasses, and special rows moved between layouts.

Training code asks here instead of reaching into attention modules itself: a key/value-mode table gives K and V
directly, so the projections of its layers get no gradient; and the base model's special rows (sink, padding) are
converted to a new table's layout exactly as the processor would read them.
"""

from __future__ import annotations

import torch

from conditioner.encode import anchor_weights
from conditioner.table import TagTable
from unet_patch.kv import layer_key_value


def kv_projections(unet: torch.nn.Module, table: TagTable) -> list[torch.nn.Module]:
    """The key and value projections of every cross-attention layer of ``table``, in layer order.

    Args:
        unet (`torch.nn.Module`): the UNet the table was built for.
        table (`TagTable`): the table; its layers name the attn2 modules.

    Returns:
        `list[torch.nn.Module]`: ``[key projection, value projection]`` of each layer, flattened.
    """
    out = []
    for layer in table.layers:
        attn = unet.get_submodule(layer.name)
        out.extend([attn.to_k, attn.to_v])
    return out


def bypassed_parameters(unet: torch.nn.Module, table: TagTable) -> list[torch.nn.Parameter]:
    """The UNet parameters that ``table`` bypasses: none in vector mode, every layer's key/value projection in kv mode.

    A key/value-mode table hands K and V to the processor directly, so these parameters never receive a gradient;
    freeze them when the rest of the UNet trains.

    Args:
        unet (`torch.nn.Module`): the UNet the table was built for.
        table (`TagTable`): the table.
    """
    if not table.mode_spec.direct_kv:
        return []
    return [p for module in kv_projections(unet, table) for p in module.parameters()]


@torch.no_grad()
def special_rows_from(base: TagTable, table: TagTable, unet: torch.nn.Module) -> torch.Tensor | None:
    """The base table's special rows (sink, padding), converted to ``table``'s layout.

    A pretrained UNet relies on its sink: a fresh table with a random sink would start from images the base never
    produced. Only a vector-mode base can be converted (its rows are inputs of the projections). The base's anchors
    are resampled at ``table``'s anchors. A vector-mode ``table`` gets, per group, the mean of the base's rows over
    the layers of that group; a key/value-mode ``table`` gets each layer's own K and V of the base's row for that
    layer (``norm_cross`` included), which is exact at the anchors (between anchors, K and V are interpolated where
    the base interpolated its inputs: the same when the layer has no ``norm_cross``, close when it has).
    Special row ``i`` of ``table`` comes from row ``i`` of the base, or from the base's last row when it has fewer.

    Args:
        base (`TagTable`): the base model's table.
        table (`TagTable`): the new table (its layers, groups, anchors and number of special rows are used).
        unet (`torch.nn.Module`): the UNet both tables were built for.

    Returns:
        `torch.Tensor | None`: ``(S, A, W)`` special rows for ``table``, or `None` when ``base`` is not vector mode.
    """
    if base.mode_spec.direct_kv:
        return None
    count = table.special.shape[0]
    pick = torch.arange(count).clamp(max=base.special.shape[0] - 1)
    # resample the base's anchors at the new table's anchors: (A_new, A_base)
    weights = anchor_weights(base.anchors, torch.tensor(table.anchors)) if base.num_anchors > 1 else None
    special = torch.zeros_like(table.special)  # (S, A, W)
    for li, layer in enumerate(table.layers):
        src = base.special[pick][:, :, base.group_columns(base.layer_group[li])]  # (S, A_base, D)
        src = src[:, :1].expand(-1, table.num_anchors, -1) if weights is None else torch.einsum(
            "na,sad->snd", weights.to(src.dtype), src)  # (S, A_new, D)
        if table.mode_spec.direct_kv:
            key, value = layer_key_value(unet.get_submodule(layer.name), src.to(table.special.dtype))  # (S, A, inner)
            special[:, :, table.group_columns(li)] = torch.cat([key, value], -1)
        else:
            group = table.layer_group[li]
            members = sum(1 for g in table.layer_group if g == group)
            special[:, :, table.group_columns(group)] += src / members
    return special
