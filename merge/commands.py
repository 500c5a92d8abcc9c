"""The subcommands of ``condvec-merge`` (:mod:`merge.cli` parses the arguments and calls one of these)."""

from __future__ import annotations

import json
import os

import torch

from conditioner.cli_errors import UsageError
from conditioner.errors import CondvecError
from conditioner.factor import FactorRows, factorise, unfactorise
from conditioner.regroup import regroup
from conditioner.safefile import check_finite
from conditioner.table import TagTable
from merge.concepts import blend, mix, swap
from merge.tables import combine, combine_streamed, drop, extract, rename


def _destination(args, source: str | None) -> str:
    in_place = getattr(args, "in_place", False)
    if in_place and args.output:
        raise UsageError(f"{args.command}: give either -o OUT or --in-place, not both")
    if not in_place and not args.output:
        raise UsageError(f"{args.command}: say where to write: -o OUT.safetensors, or --in-place to rewrite TABLE")
    if in_place:
        _check_writable(source, args.force)
        return source
    if os.path.exists(args.output) and not args.force:
        raise UsageError(f"{args.command}: output {args.output!r} already exists; pass --force to overwrite it")
    return args.output


def _check_writable(path: str, force: bool) -> None:
    """Refuse to rewrite a table the user marked read-only (no write bit) or cannot write, unless ``force``."""
    if force or not os.path.exists(path):
        return
    marked = not os.stat(path).st_mode & 0o222
    if marked or not os.access(path, os.W_OK):
        why = "is marked read-only" if marked else "is not writable by you"
        raise UsageError(f"--in-place: {path!r} {why}; pass --force to replace it anyway, or write -o OUT")


def _write(table: TagTable, path: str, what: str) -> str:
    table.save(path)  # atomic and durable: conditioner.fileio.atomic_path
    return f"wrote {path}: {what} ({len(table)} tags)"


def _blend(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    result = blend(table, args.new, args.expression, layers=args.layers, slerp=args.slerp, overwrite=args.force)
    record = result.provenance[-1]
    return _write(result, out, f"{'slerp' if args.slerp else 'blend'} {record['result']!r} = {args.expression}"
                  + _where(args.layers))


def _swap(args) -> str:
    if args.rest is not None and args.layers is None:
        raise UsageError("swap: --rest says what NEW is outside --layers; without --layers the swap covers every "
                          "group and there is no rest")
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    result = swap(table, args.new, key=args.key, value=args.value, layers=args.layers, rest=args.rest or "key",
                  overwrite=args.force)
    record = result.provenance[-1]
    rest = f", rest={record['rest']}" if args.layers else ""
    return _write(result, out, f"swap {record['result']!r} = key {record['key']!r}, value {record['value']!r}"
                  + _where(args.layers) + rest)


def _mix(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    result = mix(table, args.new, a=args.a, b=args.b, layers=args.layers, overwrite=args.force)
    record = result.provenance[-1]
    return _write(result, out, f"mix {record['result']!r} = {record['a']!r} in {args.layers}, {record['b']!r} "
                  "elsewhere")


def _drop(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.open(args.table)  # streamed: the kept rows go from the mapped file to the new one in chunks
    if isinstance(table.data, FactorRows):  # factorised rows are small and read whole: edit the factors
        result = drop(table, args.tags, match=args.match)
        result.save(out)
    else:
        result = drop(table.skeleton(), args.tags, match=args.match)
        result.save_streamed(out, table, [table.index[name] for name in result.tags])
    gone = len(table) - len(result)
    return f"wrote {out}: dropped {gone} tag{'s' if gone != 1 else ''} ({len(result)} tags)"


def _rename(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.open(args.table)  # streamed, as drop; a rename keeps every row where it is
    if isinstance(table.data, FactorRows):
        result = rename(table, args.old, args.new, overwrite=args.force)
        result.save(out)
    else:
        result = rename(table.skeleton(), args.old, args.new, overwrite=args.force)
        result.save_streamed(out, table, list(range(len(table))))
    record = result.provenance[-1]
    return f"wrote {out}: renamed {record['old']!r} to {record['new']!r} ({len(result)} tags)"


def _extract(args) -> str:
    out = _destination(args, None)
    result = extract(TagTable.open(args.table), args.tags)  # memory-mapped: only the extracted rows are read
    return _write(result, out, f"extracted {', '.join(map(repr, result.tags))}")


def _regroup(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    if not table.mode_spec.groupable:
        raise UsageError("regroup: a key/value-mode table holds each layer's own K and V and cannot be regrouped")
    result = regroup(table, args.groups)
    return _write(result, out, f"regrouped {table.group_kind} ({len(table.group_names)} groups) → {args.groups} "
                  f"({len(result.group_names)} groups)")


def _factorise(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    result, error = factorise(table, args.rank)
    full, stored = len(table) * table.num_anchors * table.width * 4, result.data.numel() * 4
    return _write(result, out, f"factorised at rank {args.rank}: tag rows {_size(full)} → {_size(stored)} (fp32), "
                  f"relative error {error:.3g}")


def _unfactorise(args) -> str:
    out = _destination(args, args.table)
    table = TagTable.load(args.table)
    result = unfactorise(table)
    return _write(result, out, f"full rows rebuilt exactly from rank-{table.data.rank} factors")


def _combine(args) -> str:
    out = _destination(args, None)
    left, right = TagTable.open(args.left), TagTable.open(args.right)  # mapped: rows stream into the new file
    files = [os.path.basename(args.left), os.path.basename(args.right)]
    try:
        if isinstance(left.data, FactorRows) or isinstance(right.data, FactorRows):
            result = combine(left, right, on_conflict=args.on_conflict)
            result.provenance[-1]["files"] = files
            result.save(out)
        else:
            result = combine_streamed(left, right, out, on_conflict=args.on_conflict, files=files)
    except CondvecError as err:
        raise CondvecError(f"{args.left} + {args.right}: {err}") from err
    record = result.provenance[-1]
    conflicts = f", {len(record['conflicts'])} conflicts resolved ({args.on_conflict})" if record["conflicts"] else ""
    return f"wrote {out}: combined, {record['added']} tags added from {args.right}{conflicts} ({len(result)} tags)"


def _where(layers: str | None) -> str:
    return f" in {layers}" if layers else ""


# ----------------------------------------------------------------------------- list
def _list(args) -> str | None:
    table = TagTable.open(args.table)  # memory-mapped: rows are read a chunk at a time for their norms
    summary = _summary(table, args.table)
    if args.json:
        print(json.dumps(summary, indent=2))
        return None
    base = table.base_model.get("name") or "unnamed base"
    if "layout_sha256" in table.base_model:
        base += f" (layout {table.base_model['layout_sha256']})"
    anchors = ", ".join(f"{a:g}" for a in table.anchors)
    lines = [
        f"{args.table}: {len(table)} tags ({summary['split_tags']} split), {table.mode} mode, "
        f"{len(table.group_names)} groups ({table.group_kind}), {len(table.layers)} layers, "
        f"{table.num_anchors} anchor{'s' if table.num_anchors > 1 else ''} (t = {anchors}), {base}, "
        f"{_size(summary['file_bytes'])}"
    ]
    if len(table):
        width = max(3, *(len(tag["name"]) for tag in summary["tags"]))
        lines.append(f"{'tag':<{width}}  {'count':>7}  split  norm per group (min / mean / max over groups)")
        for tag in summary["tags"]:
            norms = tag["norms"]
            lines.append(f"{tag['name']:<{width}}  {tag['count']:>7}  {'yes' if tag['split'] else 'no':<5}  "
                         f"{min(norms):.3g} / {sum(norms) / len(norms):.3g} / {max(norms):.3g}")
    print("\n".join(lines))
    return None


def _summary(table: TagTable, path: str) -> dict:
    norms = _group_norms(table, table.data)  # (R, G)
    tags = []
    for row, name in enumerate(table.tags):
        entry = {"name": name, "count": table.counts.get(name, 0), "split": table.is_split(name),
                 "norms": [round(float(n), 6) for n in norms[row]]}
        if table.is_split(name):
            value_norms = _group_norms(table, table.values[name][None])[0]
            entry["value_norms"] = [round(float(n), 6) for n in value_norms]
        tags.append(entry)
    return {
        "file": path, "file_bytes": os.path.getsize(path), "mode": table.mode, "group_kind": table.group_kind,
        "groups": table.group_names, "layers": [layer.short for layer in table.layers], "anchors": table.anchors,
        "base_model": table.base_model, "use_sink": table.use_sink, "pad_to": table.pad_to,
        "num_tags": len(table), "split_tags": len(table.values), "provenance": table.provenance, "tags": tags,
    }


def _group_norms(table: TagTable, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``(R, A, W)`` rows → ``(R, G)`` L2 norm of each group's vector (K and V together in kv mode), anchor mean;
    ``chunk`` rows at a time, so a memory-mapped table is never held in memory whole."""
    columns = [table.group_columns(g) for g in range(len(table.group_names))]
    out = []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk].float()  # (c, A, W)
        if table.lazy and rows is table.data:  # memory-mapped rows are checked as they are read, as load would
            check_finite(table.source, "data", part, table.tags[start:start + chunk])
        out.append(torch.stack([part[..., cols].norm(dim=-1) for cols in columns], -1).mean(1))  # (c, G)
    return torch.cat(out) if out else rows.new_zeros(0, len(columns))


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size, unit = num_bytes / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"

