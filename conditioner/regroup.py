"""Moving a vector-mode table between layer groupings: single ↔ blocks ↔ layers ↔ explicit mappings.

Every layer reads the vector of its group. A new group whose layers all read one old group copies that group's
vector; a new group spanning several old groups takes the mean over its layers of what each layer read. So
single → blocks → layers copies (every layer keeps reading exactly what it read), layers → single averages, and
single → layers → single gives back the same vectors. Key/value-mode tables need the UNet's projections:
``unet_patch.kv_table``.
"""

from __future__ import annotations

import torch

from conditioner.errors import CondvecError
from conditioner.table import TagTable, resolve_groups


def group_mixing(table: TagTable, layer_group: list[int], num_groups: int) -> torch.Tensor:
    """``(G_new, G_old)`` weights: new group ``g`` = mean over its layers of the old group each layer reads."""
    mix = torch.zeros(num_groups, len(table.group_names), dtype=torch.float64)
    for li, group in enumerate(layer_group):
        mix[group, table.layer_group[li]] += 1
    return mix / mix.sum(1, keepdim=True)


def regroup(table: TagTable, groups) -> TagTable:
    """A copy of a vector-mode table with another layer grouping.

    Args:
        table (`TagTable`): a vector-mode table.
        groups (`str | dict`): ``"single"``, ``"blocks"``, ``"layers"`` or an explicit mapping (see
            ``conditioner.table.resolve_groups``).

    Returns:
        `TagTable`: the same tags, special rows, split value sources, pooled vectors and metadata, in the new
        layout; the table's provenance records the change.

    Raises:
        CondvecError: the table is in key/value mode (its rows are per-layer K and V, which cannot be regrouped).
    """
    if not table.mode_spec.groupable:
        raise CondvecError("a key/value-mode table cannot be regrouped: its rows are each layer's own K and V")
    if not isinstance(table.data, torch.Tensor):
        raise CondvecError("a factorised table cannot be regrouped as it is: unfactorise it first "
                           "(condvec-merge unfactorise), regroup, then factorise again")
    names, layer_group = resolve_groups(table.layers, groups)
    mix = group_mixing(table, layer_group, len(names))
    dim = table.dim

    def convert(x: torch.Tensor) -> torch.Tensor:
        """``(..., G_old · D)`` → ``(..., G_new · D)``."""
        grouped = x.reshape(*x.shape[:-1], len(table.group_names), dim).double()  # (..., G_old, D)
        out = torch.einsum("ng,...gd->...nd", mix.to(x.device), grouped)  # (..., G_new, D)
        return out.reshape(*x.shape[:-1], len(names) * dim).to(x.dtype)

    kind = groups if isinstance(groups, str) else "custom"
    return table.copy().replace(
        group_names=names, layer_group=layer_group, group_kind=kind, data=convert(table.data),
        special=convert(table.special), values={name: convert(value) for name, value in table.values.items()},
        provenance=table.provenance + [{"op": "regroup", "from": table.group_kind, "to": kind}])
