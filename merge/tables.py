"""Whole-table edits: drop, rename, extract a subset, combine two tables.

Every function returns a new table and leaves its inputs untouched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch

from conditioner.errors import CondvecError
from conditioner.factor import FactorRows, take_rows
from conditioner.table import TagTable, extra_rows
from merge.concepts import _resolve

_CONFLICT = ("error", "left", "right", "mean")
#: Longest ``drop`` pattern accepted (a tag list is matched, not a document).
MAX_PATTERN = 1000


def _risky_repeat(items, inside: bool = False) -> bool:
    """Whether a parsed pattern repeats something that itself repeats or alternates (``(a+)+``, ``(a|aa)*``):
    the shapes whose backtracking can take exponential time on a non-matching name."""
    from re import _constants as c

    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            repeats = av[1] != av[0]  # a variable count: the backtracking kind
            if repeats and inside:
                return True
            if _risky_repeat(av[2], inside or repeats):
                return True
        elif op is c.BRANCH:
            if inside:
                return True
            if any(_risky_repeat(branch, inside) for branch in av[1]):
                return True
        elif op is c.SUBPATTERN:
            if _risky_repeat(av[3], inside):
                return True
        elif op in (c.ASSERT, c.ASSERT_NOT, getattr(c, "ATOMIC_GROUP", None)):
            if _risky_repeat(av[1] if op in (c.ASSERT, c.ASSERT_NOT) else av, inside):
                return True
        elif op is c.GROUPREF_EXISTS:
            if any(part is not None and _risky_repeat(part, inside) for part in av[1:]):
                return True
    return False


def compile_match(match: str) -> re.Pattern:
    """``match`` compiled, or a one-line :class:`CondvecError`: not a regex, too long, or shaped for catastrophic
    backtracking (a repeated group that repeats or alternates inside; write ``a+`` for ``(a+)+``)."""
    if len(match) > MAX_PATTERN:
        raise CondvecError(f"match pattern is {len(match)} characters long; the limit is {MAX_PATTERN}")
    try:
        pattern = re.compile(match)
        from re import _parser

        parsed = _parser.parse(match)
    except re.error as err:
        raise CondvecError(f"match pattern {match!r} is not a valid regular expression ({err})") from err
    if _risky_repeat(list(parsed)):
        raise CondvecError(f"match pattern {match!r} repeats a group that itself repeats or alternates, which can "
                           "take exponential time; write it without the nesting (e.g. 'a+' for '(a+)+', "
                           "'(?:cat|dog)' without a repeat around it)")
    return pattern


def drop(table: TagTable, tags: Sequence[str] = (), match: str | None = None) -> TagTable:
    """Remove tags with all their data: rows, value sources of split tags, training counts.

    The saved result holds no trace of the dropped tags: their vectors are gone, the new provenance entry records
    only how many tags were dropped, and earlier provenance entries that named them (as inputs or results of a
    blend, swap, …) name ``"<dropped>"`` instead — a name can be what the user wanted gone.

    Args:
        table (`TagTable`): the source table (not modified).
        tags (`Sequence[str]`, defaults to `()`): names of tags to drop; each must exist.
        match (`str`, *optional*): a regular expression; every tag whose name it matches (``re.search``, so anchor
            it with ``^…$`` to match whole names) is dropped too. It must match at least one tag.

    Returns:
        `TagTable`: a copy without those tags.

    Raises:
        CondvecError: nothing to drop, unknown tags (with close matches), an invalid regex or one that matches no tag.

    Example:
        ```py
        >>> out = drop(table, ["cat"], match=r"^style:")
        ```
    """
    if isinstance(tags, str):
        tags = [tags]
    if not tags and match is None:
        raise CondvecError("nothing to drop: name tags or give a regular expression to match")
    names = _resolve(table, list(tags))
    if match is not None:
        pattern = compile_match(match)
        matched = [name for name in table.tags if pattern.search(name)]
        if not matched:
            raise CondvecError(f"match pattern {match!r} matches no tag of the {len(table.tags)} in the table")
        names += matched
    names = list(dict.fromkeys(names))
    chosen = set(names)
    # ``--match`` may catch a multi-vector tag's extra rows along with their owner: they go with it.
    names = [n for n in names if table.vector_owner(n) not in chosen]
    out = table.copy()
    out.remove_tags(names)
    out.provenance = _scrub(out.provenance, set(names))
    out.provenance.append({"op": "drop", "count": len(names)})
    return out


# provenance fields that hold tag names (see merge.concepts and the functions here)
_NAME_FIELDS = ("inputs", "result", "key", "value", "a", "b", "old", "new", "conflicts")


def _scrub(entries: list[dict], names: set[str]) -> list[dict]:
    """Provenance entries with every mention of ``names`` replaced by ``"<dropped>"``."""
    def scrub(value):
        if isinstance(value, str):
            return "<dropped>" if value in names else value
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    cleaned = []
    for entry in entries:
        entry = {k: scrub(v) if k in _NAME_FIELDS else v for k, v in entry.items()}
        if isinstance(entry.get("right_provenance"), list):
            entry["right_provenance"] = _scrub(entry["right_provenance"], names)
        cleaned.append(entry)
    return cleaned


def rename(table: TagTable, old: str, new: str, overwrite: bool = False) -> TagTable:
    """Rename a tag, keeping its vectors, value source and training count.

    Args:
        table (`TagTable`): the source table (not modified).
        old (`str`): the existing tag.
        new (`str`): its new name (normalised like every tag).
        overwrite (`bool`, defaults to `False`): if ``new`` already exists, drop that tag first instead of raising.

    Returns:
        `TagTable`: a copy with the tag renamed and a provenance entry.

    Raises:
        CondvecError: ``old`` unknown (with close matches), ``new`` empty, or ``new`` exists.
    """
    (old_name,) = _resolve(table, [old])
    new_name = table.normalization.apply(new)
    if not new_name:
        raise CondvecError("the new tag name must not be empty")
    if new_name == old_name:
        raise CondvecError(f"{old!r} and {new!r} are the same tag after normalisation ({old_name!r})")
    out = table.copy()
    if new_name in table:
        if not overwrite:
            raise CondvecError(f"tag {new_name!r} already exists (pass overwrite=True, or --force on the command "
                               "line, to replace it)")
        out.remove_tags([new_name])
    out.rename_tag(old_name, new_name)
    out.provenance.append({"op": "rename", "inputs": [old_name], "result": new_name, "old": old_name, "new": new_name})
    return out


def extract(table: TagTable, tags: Sequence[str]) -> TagTable:
    """A table with only some tags, to ship one concept as a small file.

    The layout, special rows (sink, padding), base model, normalisation and provenance are kept, so the result
    loads onto the same UNets and :func:`combine` puts it back into another table of the same base.

    Args:
        table (`TagTable`): the source table (not modified).
        tags (`Sequence[str]`): the tags to keep; they stay in the table's row order.

    Returns:
        `TagTable`: a new table with those tags (their vectors, value sources and training counts).

    Raises:
        CondvecError: no tags given, or unknown tags (with close matches).
    """
    if isinstance(tags, str):
        tags = [tags]
    if not tags:
        raise CondvecError("name at least one tag to extract")
    keep = _resolve(table, list(tags))
    table.check_whole_tags(keep, "extract")
    rows = {name for owner in keep for name in [owner, *extra_rows(owner, table.vectors.get(owner, 1))]}
    ids = [i for i, name in enumerate(table.tags) if name in rows]
    names = [table.tags[i] for i in ids]
    index = torch.tensor(ids, dtype=torch.long)
    # only the kept rows are read: a memory-mapped table (TagTable.open) is never loaded whole
    data = table.data[index].float() if table.lazy and not isinstance(table.data, FactorRows) \
        else take_rows(table.data, index)
    pooled = None
    if table.pooled is not None:
        pooled = table.pooled[index].float() if table.lazy else table.pooled[index].clone()
    out = table.replace(
        tags=names, data=data, pooled=pooled,
        values={n: v.clone() for n, v in table.values.items() if n in rows},
        counts={n: c for n, c in table.counts.items() if n in rows},
        vectors={n: c for n, c in table.vectors.items() if n in rows},
        special=table.special.clone(), null_pooled=None if table.null_pooled is None else table.null_pooled.clone(),
        **{name: copy.deepcopy(getattr(table, name)) for name in ("layers", "group_names", "layer_group", "anchors",
                                                                  "normalization", "base_model", "provenance")})
    out.provenance.append({"op": "extract", "inputs": list(out.tags)})
    return out


def combine(left: TagTable, right: TagTable, on_conflict: str = "error") -> TagTable:
    """Merge two tables of the same base into one: left's tags, then right's new tags.

    The tables must agree on everything that decides how a vector is read: layers (names and dims), mode, groups,
    timestep anchors, tag normalisation, sink and padding use, and the base model identity where both record the
    same field. A tag in both tables with different data (key or value source) is a conflict; so are different
    sink/padding rows. Tags whose data is bit-identical in both tables are not conflicts (left's entry is kept).

    Args:
        left (`TagTable`): the first table (not modified); its tag order comes first.
        right (`TagTable`): the second table (not modified).
        on_conflict (`str`, defaults to `"error"`): ``"error"`` raises listing the conflicts; ``"left"`` / ``"right"``
            keep that table's vectors, value source and count; ``"mean"`` averages the two (key and value sources
            separately, per anchor) and sums the training counts.

    Returns:
        `TagTable`: the combined table, with a provenance entry that also records right's provenance.

    Raises:
        CondvecError: the tables differ in layout (the message says what differs), a bad ``on_conflict``, or conflicts
            with ``on_conflict="error"``.
    """
    _check_combinable(left, right, on_conflict)
    conflicts, special_conflict = _conflicts(left, right, on_conflict)
    out, data, pooled, rows = _combined(left, right, on_conflict, conflicts, special_conflict)
    index = torch.tensor(rows, dtype=torch.long)
    if isinstance(data, FactorRows):
        out.data = data.take(index)
    else:
        out.data = data[index].to(left.data.dtype) if rows else left.data[:0].clone()
    if pooled is not None:
        out.pooled = pooled[index].to(left.pooled.dtype) if rows else left.pooled[:0].clone()
    return out


def _check_combinable(left: TagTable, right: TagTable, on_conflict: str) -> None:
    if on_conflict not in _CONFLICT:
        raise CondvecError(f"on_conflict must be one of {', '.join(_CONFLICT)}, got {on_conflict!r}")
    differences = _differences(left, right)
    if differences:
        raise CondvecError("the tables were not built for the same base and layout: " + "; ".join(differences))


def _conflicts(left: TagTable, right: TagTable, on_conflict: str) -> tuple[list[str], bool]:
    """Tags in both tables with different rows (only those rows are read), and whether the special rows differ;
    raises listing them for ``on_conflict="error"``."""
    special_conflict = not torch.equal(left.special, right.special.to(left.special))
    conflicts = [name for name in right.tags if name in left and not _same(left, right, name)]
    if on_conflict == "error" and (conflicts or special_conflict):
        listed = [repr(n) for n in conflicts[:10]]
        if len(conflicts) > 10:
            listed.append(f"and {len(conflicts) - 10} more")
        parts = []
        if conflicts:
            parts.append(f"{len(conflicts)} tag{'s' if len(conflicts) > 1 else ''} with different vectors in both "
                         f"tables: {', '.join(listed)}")
        if special_conflict:
            parts.append("different sink/padding rows")
        raise CondvecError("conflicts: " + "; ".join(parts)
                           + "; choose on_conflict (--on-conflict) left, right or mean")
    return conflicts, special_conflict


def combine_streamed(left: TagTable, right: TagTable, path, on_conflict: str = "error", dtype="fp32",
                     files: list[str] | None = None) -> TagTable:
    """:func:`combine` written straight to ``path``: the rows stream from ``left`` and ``right`` (memory-mapped by
    ``TagTable.open``) into the new file a chunk at a time, so neither table is ever held whole. The file equals
    ``combine(left, right).save(path)``; returns the combined table's shape-only skeleton (its metadata).
    ``files`` (the inputs' names) go into the provenance record.

    Raises:
        CondvecError: as :func:`combine`; nothing is written then.
    """
    from types import SimpleNamespace

    _check_combinable(left, right, on_conflict)
    conflicts, special_conflict = _conflicts(left, right, on_conflict)
    out, data, pooled, rows = _combined(left, right, on_conflict, conflicts, special_conflict)
    if files is not None:
        out.provenance[-1]["files"] = files
    out.save_streamed(path, SimpleNamespace(data=data, pooled=pooled, source=None), rows, dtype=dtype)
    return out


def _combined(left: TagTable, right: TagTable, on_conflict: str, conflicts: list[str], special_conflict: bool):
    """The combined table as a skeleton (metadata, special rows, value sources, counts; rows shape-only), the
    row sources it reads (left's rows, then right's, then computed means), and which source row each of its rows is.
    """
    out = left.skeleton()
    if special_conflict:
        if on_conflict == "right":
            out.special = right.special.to(out.special).clone()
        elif on_conflict == "mean":
            out.special = (left.special.double() + right.special.double()).div(2).to(out.special.dtype)
    count = len(left.tags)
    rows = list(range(count))
    added = [name for name in right.tags if name not in left]
    if added:
        out.add_tags(added)
        rows += [count + right.row(name) for name in added]
        for name in added:
            if right.is_split(name):
                out.set_value_source(name, right.value_source(name).float())
            if name in right.counts:
                out.counts[name] = right.counts[name]
    means, pooled_means = [], []
    for name in conflicts:
        row = out.row(name)
        if on_conflict == "right":
            rows[row], key, value = count + right.row(name), right.data[right.row(name)], right.value_source(name)
            out.counts.pop(name, None)
            if name in right.counts:
                out.counts[name] = right.counts[name]
        elif on_conflict == "mean":
            key = _mean(left.data[left.row(name)].float(), right.data[right.row(name)].float())
            value = _mean(left.value_source(name).float(), right.value_source(name).float())
            rows[row] = count + len(right.tags) + len(means)
            means.append(key)
            if left.pooled is not None:
                pooled_means.append(_mean(left.pooled[left.row(name)].float(), right.pooled[right.row(name)].float()))
            out.counts[name] = left.counts.get(name, 0) + right.counts.get(name, 0)
        else:
            continue
        key, value = key.float(), value.float()
        out.set_value_source(name, None if torch.equal(value, key) else value)
    out.provenance.append({
        "op": "combine", "left_tags": len(left.tags), "right_tags": len(right.tags), "on_conflict": on_conflict,
        "added": len(added),
        "conflicts": conflicts, "special_conflict": special_conflict, "right_provenance": right.provenance,
    })
    if isinstance(left.data, FactorRows):
        data = left.data.append(right.data)
        if means:
            data = data.append(torch.stack(means))
    else:
        data = _Union([left.data, right.data] + ([torch.stack(means)] if means else []))
    pooled = None
    if left.pooled is not None:
        pooled = _Union([left.pooled, right.pooled] + ([torch.stack(pooled_means)] if pooled_means else []))
    return out, data, pooled, rows


class _Union:
    """Row tensors stacked without copying: row ``i`` is part 0's, then part 1's … (each may be memory-mapped)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        self.dtype = torch.float32

    def __getitem__(self, index) -> torch.Tensor:
        from conditioner.table import release_pages

        ids = torch.as_tensor(index, dtype=torch.long)
        single = ids.dim() == 0
        ids = ids.reshape(-1)
        out = torch.empty(ids.numel(), *self.shape[1:], dtype=torch.float32)
        for part, start in zip(self.parts, self.starts):
            mask = (ids >= start) & (ids < start + part.shape[0])
            if bool(mask.any()):
                chosen = ids[mask] - start
                out[mask] = part[chosen].float()
                release_pages(part, chosen)
        return out[0] if single else out


def _mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() + b.double()) / 2).to(a.dtype)


def _same(left: TagTable, right: TagTable, name: str) -> bool:
    if left.is_split(name) != right.is_split(name):
        return False
    a, b = left.data[left.row(name)], right.data[right.row(name)].to(device=left.data.device,
                                                                       dtype=left.data.dtype)
    if not torch.equal(a, b):
        return False
    return not left.is_split(name) or torch.equal(left.value_source(name), right.value_source(name).to(a))


def _differences(left: TagTable, right: TagTable) -> list[str]:
    """What differs between two tables' layouts, one short phrase per field."""
    found = []
    if left.mode != right.mode:
        found.append(f"mode {left.mode} vs {right.mode}")
    if [layer.to_dict() for layer in left.layers] != [layer.to_dict() for layer in right.layers]:
        if len(left.layers) != len(right.layers):
            found.append(f"{len(left.layers)} vs {len(right.layers)} cross-attention layers")
        else:
            first = next(i for i, (a, b) in enumerate(zip(left.layers, right.layers)) if a != b)
            found.append(f"layer {first} differs ({left.layers[first].short}: {left.layers[first].to_dict()} vs "
                         f"{right.layers[first].to_dict()})")
    if left.group_names != right.group_names or left.layer_group != right.layer_group:
        found.append(f"layer groups {len(left.group_names)} ({left.group_kind}) vs {len(right.group_names)} "
                     f"({right.group_kind})" + (" with other members" if len(left.group_names) ==
                                               len(right.group_names) else ""))
    if left.anchors != right.anchors:
        found.append(f"timestep anchors {left.anchors} vs {right.anchors}")
    ranks = [t.data.rank if isinstance(t.data, FactorRows) else 0 for t in (left, right)]
    if ranks[0] != ranks[1]:
        found.append("rows " + " vs ".join(f"factorised at rank {r}" if r else "full" for r in ranks)
                     + " (condvec-merge factorise / unfactorise one of them)")
    if left.normalization.to_dict() != right.normalization.to_dict():
        found.append(f"tag normalisation {left.normalization.to_dict()} vs {right.normalization.to_dict()}")
    if left.use_sink != right.use_sink:
        found.append(f"use_sink {left.use_sink} vs {right.use_sink}")
    if left.pad_to != right.pad_to:
        found.append(f"pad_to {left.pad_to} vs {right.pad_to}")
    for key in sorted(set(left.base_model) & set(right.base_model)):
        if left.base_model[key] != right.base_model[key]:
            found.append(f"base model {key} {left.base_model[key]!r} vs {right.base_model[key]!r}")
    return found
