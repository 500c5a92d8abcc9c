"""Vector-mode tables to key/value mode, through each layer's own key and value projections."""

from __future__ import annotations

import torch

from conditioner.errors import CondvecError
from conditioner.modes import KV
from conditioner.table import TagTable
from unet_patch.discover import discover


def layer_key_value(attn, source: torch.Tensor, value_source: torch.Tensor | None = None):
    """K and V of ``source`` vectors exactly as ``CondvecAttnProcessor`` makes them (``norm_cross`` included)."""
    if attn.norm_cross:
        source = attn.norm_encoder_hidden_states(source)
        value_source = None if value_source is None else attn.norm_encoder_hidden_states(value_source)
    return attn.to_k(source), attn.to_v(source if value_source is None else value_source)


@torch.no_grad()
def kv_table(table: TagTable, unet: torch.nn.Module) -> TagTable:
    """A key/value-mode copy of a vector-mode table: each layer's K and V of the vector that layer read.

    Exact: the UNet patched with the result gives the same outputs as with ``table`` (to float rounding). Split tags
    take V from their value source.

    Args:
        table (`TagTable`): a vector-mode table built for ``unet``.
        unet (`torch.nn.Module`): the UNet (its attn2 ``to_k`` / ``to_v`` weights are used).
    """
    if table.mode_spec.direct_kv:
        return table.copy()
    if not isinstance(table.data, torch.Tensor):
        raise CondvecError("a factorised (or disk-backed) table cannot become a key/value table as it is: "
                           "unfactorise it (condvec-merge unfactorise) or load it whole first")
    table.check_layers(discover(unet))
    out = TagTable.create(table.layers, mode=KV, anchors=table.anchors, use_sink=table.use_sink,
                          pad_to=table.pad_to, normalization=table.normalization, base_model=table.base_model)
    width = out.width
    data = table.data.new_zeros(len(table), table.num_anchors, width)
    special = table.special.new_zeros(table.special.shape[0], table.num_anchors, width)
    split = sorted(table.values)
    for li, layer in enumerate(table.layers):
        attn = unet.get_submodule(layer.name)
        cols_in, cols_out = table.group_columns(table.layer_group[li]), out.group_columns(li)
        for target, source in ((data, table.data), (special, table.special)):
            key, value = layer_key_value(attn, source[..., cols_in].to(attn.to_k.weight.dtype))
            target[..., cols_out] = torch.cat([key, value], -1).to(target.dtype)
        for name in split:  # split tags: V from their own value source
            row = table.row(name)
            key, value = layer_key_value(attn, table.data[row, :, cols_in], table.values[name][:, cols_in])
            data[row, :, cols_out] = torch.cat([key, value], -1).to(data.dtype)
    return out.replace(tags=list(table.tags), data=data, special=special, counts=dict(table.counts),
                       pooled=table.pooled, null_pooled=table.null_pooled, negative_zeros=table.negative_zeros,
                       vectors=dict(table.vectors),
                       provenance=table.provenance + [{"op": "kv_table", "from": table.group_kind}])
