"""Checking a ``.safetensors`` file before trusting it: bounds-checked header, finite values.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{"__metadata__": {...},
name: {"dtype": ..., "shape": [...], "data_offsets": [begin, end]}}``), then the tensor bytes, offsets counted from
the end of the header. :func:`check_safetensors` validates all of that from the file size and the header alone,
before any tensor is allocated, so a damaged or hostile file (truncated, not safetensors at all, a header length of
2**64 - 1, offsets past the end) is one clear :class:`TableFileError` instead of a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import os

import torch

from conditioner.errors import CondvecError

#: Largest JSON header accepted by default (100 MB: a 100k-tag table's metadata is a few MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Bytes per element of every dtype safetensors writes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_ROWS_PER_CHUNK = 4096  # finite checks walk big tables in chunks: no full-size boolean mask


class TableFileError(CondvecError):
    """A table file is damaged, truncated, not a condvec table, or from a newer condvec; the message is one line."""


def _fail(path: str, message: str) -> TableFileError:
    return TableFileError(f"{path!r} is not a readable .safetensors table ({message})")


def _damaged(path: str, message: str) -> TableFileError:
    return TableFileError(f"{path!r}: {message}")


def check_safetensors(path: str | os.PathLike, max_header: int = MAX_HEADER_BYTES) -> dict:
    """Validate a ``.safetensors`` file's structure without reading any tensor.

    Checks, in order, each before anything is allocated from the file's claims: the file holds at least the 8-byte
    length; the header length fits in the file and is at most ``max_header``; the header is a UTF-8 JSON object;
    ``__metadata__``, if present, maps strings to strings; every tensor has a known dtype, a shape of non-negative
    integers, and ``data_offsets`` ``[begin, end]`` inside the data section with ``end - begin == prod(shape) *
    itemsize``; no two tensors overlap.

    Args:
        path (`str` or `os.PathLike`): the file.
        max_header (`int`, defaults to :data:`MAX_HEADER_BYTES`): largest accepted JSON header, in bytes.

    Returns:
        `dict`: the parsed header (tensor entries and, if present, ``"__metadata__"``).

    Raises:
        `FileNotFoundError`: no such file.
        `TableFileError`: the file is truncated, not a safetensors file, or its header is inconsistent; one line
            naming the file and what is wrong.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated or not a safetensors file ({size} bytes, shorter than the 8-byte "
                                  "header length)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise _fail(path, f"header claims {header_len} bytes but only {size - 8} follow: truncated or not a "
                                  "safetensors file")
            if header_len > max_header:
                raise _fail(path, f"header of {header_len} bytes is over the limit of {max_header}: not a table")
            raw = f.read(header_len)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"table file {path!r} does not exist") from err
    except IsADirectoryError as err:
        raise _fail(path, "is a folder, not a .safetensors file") from err
    if len(raw) != header_len:
        raise _fail(path, "file changed while reading its header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _fail(path, "header is not JSON: not a safetensors file, or a damaged one") from err
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object: not a safetensors file")

    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _fail(path, "header __metadata__ must map names to strings")
            continue
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
        begin, end = offsets
        if end > data_len:
            raise _fail(path, f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section: truncated")
        if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
            raise _fail(path, f"tensor {name!r}: shape {shape} of {dtype} needs "
                              f"{math.prod(shape) * DTYPE_SIZES[dtype]} bytes, data_offsets give {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _fail(path, f"tensors {first!r} and {second!r} overlap in the data section")
    return header


def check_finite(path: str | os.PathLike | None, name: str, tensor: torch.Tensor,
                 row_names: list[str] | None = None) -> None:
    """Raise :class:`TableFileError` if a tensor holds NaN or infinity, naming the first bad row.

    Args:
        path (`str` or `os.PathLike`, *optional*): the file the tensor came from (for the message); `None` for a
            table in memory (about to be written).
        name (`str`): what the tensor is (``"data"``, ``"special"``...).
        tensor (`torch.Tensor`): rows along the first dimension.
        row_names (`list[str]`, *optional*): a name per row (tag names); rows are numbered otherwise.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 0 else tensor.reshape(1, 1)
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        bad = (~torch.isfinite(rows[start:start + _ROWS_PER_CHUNK])).any(dim=1).nonzero()
        if len(bad):
            row = start + int(bad[0])
            label = repr(row_names[row]) if row_names is not None and row < len(row_names) else f"row {row}"
            if path is None:
                raise TableFileError(f"{name} of {label} holds NaN or infinite values: refusing to write a table "
                                     "that could not be loaded again")
            raise _damaged(os.fspath(path), f"{name} of {label} holds NaN or infinite values: the table is damaged; "
                                         "use an earlier copy or checkpoint")


def check_table(table, path: str | os.PathLike | None = None, scan_rows: bool = True) -> None:
    """Every check of a table that its constructor does not make: groups, anchors, sizes, finite values.

    :meth:`TagTable.save` runs it before writing (``path=None``) and :meth:`TagTable.load` after reading, so a
    file ``save`` writes always loads again.

    Args:
        table (`TagTable`): the table.
        path (`str` or `os.PathLike`, *optional*): the file it came from, named in the message.
        scan_rows (`bool`, defaults to `True`): scan every tag row (and pooled row) for NaN / infinity; a table
            opened memory-mapped checks the rows a prompt gathers instead.

    Raises:
        `TableFileError`: the first problem found.
    """
    from conditioner.schema import MAX_PAD_TO, MAX_VECTORS

    where = None if path is None else os.fspath(path)

    def fail(message: str) -> TableFileError:
        return TableFileError(message) if where is None else _damaged(where, message)

    table.__post_init__()  # shapes, duplicate names, multi-vector rows: the constructor's own checks
    for name in ("data", "special"):
        if getattr(table, name).dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise fail(f"{name} is {getattr(table, name).dtype}, not float32/float16/bfloat16")
    if len(table.layer_group) != len(table.layers):
        raise fail(f"{len(table.layer_group)} layer groups for {len(table.layers)} layers")
    bad = [g for g in table.layer_group if not 0 <= g < len(table.group_names)]
    if bad:
        raise fail(f"layer group {bad[0]} does not exist (the table has {len(table.group_names)} groups)")
    if not table.anchors or not all(math.isfinite(a) for a in table.anchors):
        raise fail(f"timestep anchors {table.anchors} must be one or more finite timesteps")
    if any(b <= a for a, b in zip(table.anchors, table.anchors[1:])):
        raise fail(f"timestep anchors {table.anchors} must be strictly ascending")
    if table.pad_to is not None and (type(table.pad_to) is not int or not 1 <= table.pad_to <= MAX_PAD_TO):
        raise fail(f"pad_to must be null or an integer in [1, {MAX_PAD_TO}], got {table.pad_to!r}")
    for owner, count in table.vectors.items():
        if type(count) is not int or not 2 <= count <= MAX_VECTORS:
            raise fail(f"multi-vector tag {owner!r} has {count!r} vectors; must be in [2, {MAX_VECTORS}]")
    unknown = [t for t in table.values if t not in table._index]
    if unknown:
        raise fail(f"split value source for {unknown[0]!r}, which is not a tag of the table")
    for tag, value in table.values.items():
        if tuple(value.shape) != (table.num_anchors, table.width):
            raise fail(f"value source of {tag!r} has shape {tuple(value.shape)}, expected "
                       f"{(table.num_anchors, table.width)}")
    if scan_rows:
        factors = getattr(table.data, "factors", None)  # factorised rows: their factors
        for name, tensor in (factors().items() if factors else [("", table.data)]):
            check_finite(where, f"data{'.' + name if name else ''}", tensor, table.tags)
    check_finite(where, "special", table.special, ["sink", "padding"])
    for tag, value in table.values.items():
        check_finite(where, "value source", value.unsqueeze(0), [tag])
    for name in ("pooled", "null_pooled"):
        tensor = getattr(table, name, None)
        if tensor is not None and (scan_rows or name == "null_pooled"):
            check_finite(where, name, tensor.reshape(1, -1) if tensor.dim() < 2 else tensor,
                         table.tags if name == "pooled" else None)
