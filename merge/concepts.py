"""New concepts from existing ones: weighted blends, key/value swaps and P+-style layer mixes.

Every function returns a new table and leaves its input untouched. All of them work on every timestep anchor and,
in vector mode, on key sources and value sources separately: a tag that is split (key source ≠ value source)
contributes its key source wherever a key source is taken and its value source wherever a value source is taken;
a tied tag contributes its one vector to both. A result whose value source comes out equal to its key source is
stored tied, so tables only carry value sources where they differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from conditioner.errors import CondvecError
from conditioner.table import TagTable
from merge.layers import select_groups
from merge.weights import parse_weights

# |cos θ| above this: the spherical formula divides by sin θ ≈ 0, so linear interpolation is used instead (the two
# agree to ~1e-4 relative there); the same threshold as common slerp merge tools
_PARALLEL = 0.9995
_TINY = 1e-12

_REST = ("key", "value", "tied")


def blend(
    table: TagTable,
    new: str,
    expr_or_terms: str | Sequence[tuple[str, float]] | Mapping[str, float],
    layers: str | Sequence[int | str] | None = None,
    slerp: bool = False,
    overwrite: bool = False,
) -> TagTable:
    """A new tag that is a weighted sum of existing tags, per layer group and timestep anchor.

    The weights are used as given: they need not sum to 1, and nothing is renormalised, so the result's norm scales
    with the sum of the weights (``1.0*cat + 1.0*dog`` is roughly twice as long as either; ``cat - 0.5*dog``
    subtracts). Split tags blend their key sources and their value sources separately.

    Args:
        table (`TagTable`): the source table (not modified).
        new (`str`): name of the result tag (normalised like every tag).
        expr_or_terms (`str | Sequence[tuple[str, float]] | Mapping[str, float]`): a weight expression such as
            ``"0.6*cat + 0.4*dog"`` (see :func:`parse_weights`), or ``(tag, weight)`` pairs.
        layers (`str | Sequence[int | str]`, *optional*): a layer spec (see :func:`select_groups`); the blend is
            applied only in the selected groups and the first term's tag stands unchanged (its own key and value
            sources, unweighted) in the others. `None` blends every group.
        slerp (`bool`, defaults to `False`): spherical instead of linear interpolation; needs exactly two terms whose
            weights sum to 1, ``(1 - t)*a + t*b``. Each group vector (in key/value mode: each layer's K and each
            layer's V) is interpolated along the arc between the two directions: the angle is taken between the
            normalised vectors and the sine weights are applied to the original vectors, so two vectors of equal
            norm give a result of that norm. Where the two are (anti-)parallel (|cos| > 0.9995) or one is zero, the
            arc is undefined or unstable and linear interpolation is used.
        overwrite (`bool`, defaults to `False`): replace ``new`` if it already exists instead of raising.

    Returns:
        `TagTable`: a copy with the result tag (training count 0) and a provenance entry.

    Raises:
        CondvecError: unknown tags (with close matches), a repeated tag, an expression that does not parse, a layer
            spec that matches nothing, ``new`` exists, or ``slerp`` with other than two terms or weights not summing
            to 1.

    Example:
        ```py
        >>> out = blend(table, "catdog", "0.6*cat + 0.4*dog", layers="up.*")
        ```
    """
    terms = _terms(expr_or_terms)
    names = _resolve(table, [name for name, _ in terms])
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CondvecError(f"tag {', '.join(map(repr, repeated))} appears more than once in the blend; "
                           "give each tag once with its total weight")
    weights = [weight for _, weight in terms]
    if slerp:
        if len(terms) != 2:
            raise CondvecError(f"slerp interpolates between exactly two tags, got {len(terms)} terms; "
                               "use a linear blend for more")
        if not math.isclose(weights[0] + weights[1], 1.0, abs_tol=1e-6):
            raise CondvecError(f"slerp weights must sum to 1 ((1 - t)*a + t*b), got {weights[0]:g} + {weights[1]:g} = "
                               f"{weights[0] + weights[1]:g}; use a linear blend to scale")
    groups = select_groups(table, layers)
    out, new_name = _output(table, new, overwrite)
    keys = [table.data[table.row(n)] for n in names]  # each (A, W)
    split = table.mode_spec.splittable and any(table.is_split(n) for n in names)

    def combine(sources: list[torch.Tensor]) -> torch.Tensor:
        if slerp:
            return _slerp_parts(table, sources[0], sources[1], weights[1])
        total = sum(w * s.double() for w, s in zip(weights, sources))
        return total.to(sources[0].dtype)

    mask = _group_mask(table, groups)
    key = torch.where(mask, combine(keys), keys[0])
    value = None
    if split:
        values = [table.value_source(n) for n in names]
        value = torch.where(mask, combine(values), values[0])
    _store(out, new_name, key, value)
    out.provenance.append({
        "op": "blend", "result": new_name, "inputs": names, "weights": weights, "layers": _spec(layers),
        "groups": groups, "slerp": bool(slerp),
    })
    return out


def swap(
    table: TagTable,
    new: str,
    key: str,
    value: str,
    layers: str | Sequence[int | str] | None = None,
    rest: str = "key",
    overwrite: bool = False,
) -> TagTable:
    """A new tag that attends like one concept and contributes the content of another (key/value swap).

    In the selected groups the new tag's key source (what ``to_k`` reads: *where* attention goes) is the key
    concept's key source, and its value source (what ``to_v`` reads: *what* is written there) is the value
    concept's value source — "key = elephant, value = glass" gives a glass elephant. In key/value mode the selected
    layers take their K from the key concept's row and their V from the value concept's row, and the result is a
    plain row (key/value mode has no split tags).

    Outside the selected groups, ``rest`` decides:

    - ``"key"``: the key concept as it is (its own key source and value source);
    - ``"value"``: the value concept as it is;
    - ``"tied"`` (vector mode only): the key concept's key source feeds both ``to_k`` and ``to_v``, i.e. the key
      concept's key vector tied to itself. It differs from ``"key"`` only when the key concept is itself split
      (e.g. an earlier swap): ``"key"`` keeps that split outside the selection, ``"tied"`` drops its value part there.

    Args:
        table (`TagTable`): the source table (not modified).
        new (`str`): name of the result tag.
        key (`str`): the concept whose key source (K in key/value mode) is used in the selected groups.
        value (`str`): the concept whose value source (V in key/value mode) is used in the selected groups.
        layers (`str | Sequence[int | str]`, *optional*): layer spec of the groups to swap (see
            :func:`select_groups`); `None` swaps in every group, and ``rest`` then has no effect.
        rest (`str`, defaults to `"key"`): ``"key"``, ``"value"`` or ``"tied"``, as above.
        overwrite (`bool`, defaults to `False`): replace ``new`` if it already exists instead of raising.

    Returns:
        `TagTable`: a copy with the result tag (training count 0; split in vector mode) and a provenance entry.

    Raises:
        CondvecError: unknown tags, a layer spec that matches nothing or splits a group, a bad ``rest``, ``new``
            exists.

    Example:
        ```py
        >>> out = swap(table, "glass elephant", key="elephant", value="glass", layers="up.*", rest="key")
        ```
    """
    if rest not in _REST:
        raise CondvecError(f"rest must be one of {', '.join(_REST)}, got {rest!r}")
    if rest == "tied" and table.mode_spec.direct_kv:
        raise CondvecError("rest='tied' ties the key concept's key source to to_v, which exists only in vector "
                           "mode; in "
                           "key/value mode every row holds its own K and V: use rest='key' or rest='value'")
    key_name, value_name = _resolve(table, [key, value])
    groups = select_groups(table, layers)
    out, new_name = _output(table, new, overwrite)
    mask = _group_mask(table, groups)
    key_row, value_row = table.data[table.row(key_name)], table.data[table.row(value_name)]

    if table.mode_spec.direct_kv:
        # the selected layers' K columns come from the key concept, their V columns from the value concept
        from_key = _kv_key_half_mask(table) | ~mask
        if rest == "value":
            from_key = _kv_key_half_mask(table) & mask
        _store(out, new_name, torch.where(from_key, key_row, value_row), None)
    else:
        rest_key = {"key": key_row, "value": value_row, "tied": key_row}[rest]
        rest_value = {"key": table.value_source(key_name), "value": table.value_source(value_name),
                      "tied": key_row}[rest]
        key_source = torch.where(mask, key_row, rest_key)
        value_source = torch.where(mask, table.value_source(value_name), rest_value)
        _store(out, new_name, key_source, value_source)
    out.provenance.append({
        "op": "swap", "result": new_name, "inputs": [key_name, value_name], "key": key_name, "value": value_name,
        "layers": _spec(layers), "groups": groups, "rest": rest,
    })
    return out


def mix(
    table: TagTable,
    new: str,
    a: str,
    b: str,
    layers: str | Sequence[int | str],
    overwrite: bool = False,
) -> TagTable:
    """A new tag that is concept A in the selected groups and concept B in the others (P+-style mixing).

    E.g. A's coarse layers (layout, shape) with B's fine layers (texture, colour). Each concept is taken as it is:
    a split concept brings its key and value sources.

    Args:
        table (`TagTable`): the source table (not modified).
        new (`str`): name of the result tag.
        a (`str`): the concept used in the selected groups.
        b (`str`): the concept used in every other group.
        layers (`str | Sequence[int | str]`): layer spec of A's groups (see :func:`select_groups`).
        overwrite (`bool`, defaults to `False`): replace ``new`` if it already exists instead of raising.

    Returns:
        `TagTable`: a copy with the result tag (training count 0) and a provenance entry.

    Raises:
        CondvecError: unknown tags, a layer spec that matches nothing or splits a group, ``new`` exists.

    Example:
        ```py
        >>> out = mix(table, "cat shaped dog", a="cat", b="dog", layers="down.*, mid")
        ```
    """
    if layers is None:
        raise CondvecError("mix needs a layer spec: A is used in the selected groups and B in the rest")
    a_name, b_name = _resolve(table, [a, b])
    groups = select_groups(table, layers)
    out, new_name = _output(table, new, overwrite)
    mask = _group_mask(table, groups)
    key_source = torch.where(mask, table.data[table.row(a_name)], table.data[table.row(b_name)])
    value_source = None
    if table.mode_spec.splittable and (table.is_split(a_name) or table.is_split(b_name)):
        value_source = torch.where(mask, table.value_source(a_name), table.value_source(b_name))
    _store(out, new_name, key_source, value_source)
    out.provenance.append({
        "op": "mix", "result": new_name, "inputs": [a_name, b_name], "a": a_name, "b": b_name,
        "layers": _spec(layers), "groups": groups,
    })
    return out


# ----------------------------------------------------------------------------- helpers
def _terms(expr_or_terms) -> list[tuple[str, float]]:
    if isinstance(expr_or_terms, str):
        return parse_weights(expr_or_terms)
    items = list(expr_or_terms.items()) if isinstance(expr_or_terms, Mapping) else list(expr_or_terms)
    if not items:
        raise CondvecError("a blend needs at least one (tag, weight) term")
    terms = []
    for item in items:
        try:
            name, weight = item
            weight = float(weight)
        except (TypeError, ValueError) as err:
            raise CondvecError(f"blend terms must be (tag, weight) pairs, got {item!r}") from err
        if not math.isfinite(weight):
            raise CondvecError(f"blend weight of {name!r} is not a finite number: {weight}")
        terms.append((str(name), weight))
    return terms


def _resolve(table: TagTable, names: list[str]) -> list[str]:
    """Normalised names of existing tags; unknown ones raise one error listing all of them with close matches."""
    missing = [name for name in names if name not in table]
    if missing:
        raise CondvecError(table.unknown_message(list(dict.fromkeys(missing))))
    return [table.tags[table.row(name)] for name in names]


def _output(table: TagTable, new: str, overwrite: bool) -> tuple[TagTable, str]:
    name = table.normalization.apply(new)
    if not name:
        raise CondvecError("the new tag name must not be empty")
    if name in table and not overwrite:
        raise CondvecError(f"tag {name!r} already exists (pass overwrite=True, or --force on the command line, to "
                           "replace it)")
    return table.copy(), name


def _store(out: TagTable, name: str, key: torch.Tensor, value: torch.Tensor | None) -> None:
    """Write a result row (new or replaced), tied when its value source equals its key source; count 0."""
    if name in out:
        out.data[out.row(name)] = key
    else:
        out.add_tags([name])
        out.data[out.row(name)] = key
    tied = value is None or torch.equal(value, key)
    out.set_value_source(name, None if tied else value)
    out.counts[name] = 0


def _group_mask(table: TagTable, groups: list[int]) -> torch.Tensor:
    """``(W,)`` bool: the columns of the selected groups."""
    mask = torch.zeros(table.width, dtype=torch.bool, device=table.data.device)
    for g in groups:
        mask[table.group_columns(g)] = True
    return mask


def _kv_key_half_mask(table: TagTable) -> torch.Tensor:
    """``(W,)`` bool, key/value mode: the K columns of every layer (the rest are V columns)."""
    mask = torch.zeros(table.width, dtype=torch.bool, device=table.data.device)
    for g, layer in enumerate(table.layers):
        start = table.group_columns(g).start
        mask[start : start + layer.inner_dim] = True
    return mask


def _parts(table: TagTable) -> list[slice]:
    """Column ranges interpolated as one vector by slerp: a group (vector mode), a layer's K or V (key/value)."""
    if not table.mode_spec.direct_kv:
        return [table.group_columns(g) for g in range(len(table.group_names))]
    parts = []
    for g, layer in enumerate(table.layers):
        start = table.group_columns(g).start
        parts += [slice(start, start + layer.inner_dim), slice(start + layer.inner_dim, start + 2 * layer.inner_dim)]
    return parts


def _slerp_parts(table: TagTable, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp ``(A, W)`` rows part by part (see :func:`blend`); computed in float64, returned in ``a``'s dtype."""
    out = torch.empty_like(a, dtype=torch.float64)
    for cols in _parts(table):
        out[:, cols] = _slerp(a[:, cols].double(), b[:, cols].double(), t)
    return out.to(a.dtype)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of ``(..., d)`` vectors, falling back to lerp where the arc is ill-defined."""
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    cos = ((a / norm_a.clamp_min(_TINY)) * (b / norm_b.clamp_min(_TINY))).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    safe_sin = torch.where(sin.abs() > _TINY, sin, torch.ones_like(sin))
    spherical = torch.sin((1.0 - t) * theta) / safe_sin * a + torch.sin(t * theta) / safe_sin * b
    linear = (1.0 - t) * a + t * b
    degenerate = (cos.abs() > _PARALLEL) | (norm_a <= _TINY) | (norm_b <= _TINY)
    return torch.where(degenerate, linear, spherical)


def _spec(layers) -> str | list | None:
    if layers is None or isinstance(layers, str):
        return layers
    return [item if isinstance(item, str) else int(item) for item in layers]
