"""Layer specs: which layer groups of a table an edit touches.

A spec is a comma-separated list of items; the groups it selects are the union of what every item selects:

- a group index or an inclusive range of indices: ``5``, ``0-3``;
- a kohya block name or an inclusive range of them, in UNet order (``IN`` < ``M`` < ``OUT``): ``IN01``,
  ``M00``, ``IN04-OUT05``; only for tables whose layers have kohya names (SD1.x-shaped UNets);
- a glob (``fnmatch``) over group names, layer short names (``down.1.0``), full diffusers names
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``) and block names (``down_blocks.1``,
  ``mid_block``). A pattern also matches every name that starts with the pattern followed by ``"."``, so ``mid``
  selects ``mid.0`` and ``up.1`` selects ``up.1.0`` and ``up.1.1``.

Every item must match something, so a typo is an error instead of a silently smaller selection. In vector mode
with grouped layers (``groups: blocks``, ``single`` or a mapping) the group is the unit of editing: a spec that
selects only some layers of a group is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from conditioner.errors import CondvecError
from conditioner.table import TagTable

_INDEX = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")
_KOHYA = re.compile(r"^(IN|M|OUT)(\d+)$", re.IGNORECASE)
_KOHYA_ORDER = {"IN": 0, "M": 1, "OUT": 2}


def select_groups(table: TagTable, spec: str | Sequence[int | str] | None) -> list[int]:
    """Resolve a layer spec to the indices of the groups it selects.

    Args:
        table (`TagTable`): the table whose layers and groups the spec refers to.
        spec (`str | Sequence[int | str]`, *optional*): a comma-separated spec (see the module docstring) or a
            sequence of items; `None` selects every group.

    Returns:
        `list[int]`: sorted, unique group indices.

    Raises:
        CondvecError: an item matches nothing (the message lists the groups, layers and blocks that exist), a group
            index is out of range, the spec is empty, or it selects only part of a group.

    Example:
        ```py
        >>> select_groups(table, "down.*, mid")  # a table with one group per layer
        [0, 1, 2]
        ```
    """
    num_groups = len(table.group_names)
    if spec is None:
        return list(range(num_groups))
    items = spec.split(",") if isinstance(spec, str) else [str(item) for item in spec]
    items = [item.strip() for item in items]
    if not any(items):
        raise CondvecError(f"empty layer spec {spec!r}; give group indices, layer names or globs ({_describe(table)})")
    if not all(items):
        raise CondvecError(f"layer spec {spec!r} has an empty item (two commas in a row or a trailing comma)")

    groups: set[int] = set()  # selected whole
    layer_hits: set[int] = set()  # selected layer by layer; checked against their groups below
    for item in items:
        whole, layers = _resolve_item(table, item)
        if not whole and not layers:
            raise CondvecError(f"layer spec item {item!r} matches no group or layer; {_describe(table)}")
        groups |= whole
        layer_hits |= layers

    for li in sorted(layer_hits):
        g = table.layer_group[li]
        if g in groups:
            continue
        members = [i for i, group in enumerate(table.layer_group) if group == g]
        missing = [table.layers[i].short for i in members if i not in layer_hits]
        if missing:
            chosen = [table.layers[i].short for i in members if i in layer_hits]
            raise CondvecError(
                f"layer spec {spec!r} selects only some layers of group {g} {table.group_names[g]!r} "
                f"({', '.join(chosen)}; not {', '.join(missing)}); this table has {num_groups} layer groups and "
                f"a group is the unit of editing: select all of its layers or the group itself "
                f"({g} or {table.group_names[g]!r})"
            )
        groups.add(g)
    return sorted(groups)


def _resolve_item(table: TagTable, item: str) -> tuple[set[int], set[int]]:
    """One spec item → (groups selected whole, layers selected one by one)."""
    num_groups = len(table.group_names)
    index = _INDEX.match(item)
    if index:
        lo = int(index[1])
        hi = int(index[2]) if index[2] is not None else lo
        if lo > hi:
            raise CondvecError(f"layer spec range {item!r} runs backwards; write it low-high, e.g. '{hi}-{lo}'")
        if hi >= num_groups:
            raise CondvecError(f"layer spec item {item!r}: group index {hi} is out of range, this table has groups "
                               f"0-{num_groups - 1}")
        return set(range(lo, hi + 1)), set()

    ends = [part.strip() for part in item.split("-")]
    if len(ends) == 2 and all(_KOHYA.match(end) for end in ends):
        if not all(layer.kohya for layer in table.layers):
            raise CondvecError(f"layer spec item {item!r}: this table's layers have no kohya names (only SD1.x-shaped "
                               f"UNets with one transformer block per attention have them); {_describe(table)}")
        lo, hi = (_kohya_key(end) for end in ends)
        if lo > hi:
            raise CondvecError(f"layer spec range {item!r} runs backwards; kohya order is IN00 … IN11, M00, "
                               f"OUT00 … OUT11")
        return set(), {i for i, layer in enumerate(table.layers) if lo <= _kohya_key(layer.kohya) <= hi}

    whole = {g for g, name in enumerate(table.group_names) if _glob(name, item)}
    layers = set()
    for i, layer in enumerate(table.layers):
        names = (layer.short, layer.name, layer.block)
        if any(_glob(name, item) for name in names) or (layer.kohya and _glob(layer.kohya, item.upper())):
            layers.add(i)
    return whole, layers


def _glob(name: str, pattern: str) -> bool:
    # "mid" must select "mid.0" and "up.1" must select "up.1.0": a pattern also matches its dotted children
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _kohya_key(name: str) -> tuple[int, int]:
    match = _KOHYA.match(name)
    assert match is not None
    return _KOHYA_ORDER[match[1].upper()], int(match[2])


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _describe(table: TagTable) -> str:
    """What a spec can refer to in this table, for error messages."""
    groups = [f"{g} {name}" for g, name in enumerate(table.group_names)]
    blocks = list(dict.fromkeys(layer.block for layer in table.layers))
    parts = [f"groups: {_listing(groups)}", f"layers: {_listing([layer.short for layer in table.layers])}",
             f"blocks: {_listing(blocks)}"]
    if all(layer.kohya for layer in table.layers):
        parts.append(f"kohya: {_listing([layer.kohya for layer in table.layers])}")
    return "; ".join(parts)
