"""The tag table: names ↔ rows of learned conditioning, one self-contained ``.safetensors`` file.

Data layout (``R`` tags, ``A`` timestep anchors, ``W`` packed width):

- ``data``     ``(R, A, W)``: per tag, the key source (vector mode) or K and V (key/value mode) of every group.
  Vector mode: ``W = groups × cross_dim``; group ``g`` owns columns ``[g·D, (g+1)·D)``.
  Key/value mode: one group per layer; layer ``l`` owns ``K = [o_l, o_l + I_l)`` and ``V = [o_l + I_l, o_l + 2 I_l)``.
- ``values``   ``{tag: (A, W)}``: the separate value source of *split* tags (vector mode only), e.g. a swap result
  whose attention keys come from one concept and values from another. Tags not in ``values`` are tied.
- ``special``  ``(S, A, W)``, ``S >= 2``: the attention-sink row (index 0) and padding rows: padding at sequence
  position ``i`` reads row ``min(i, S - 1)``. Tables trained from scratch have one padding row (``S = 2``); a table
  bootstrapped from a pretrained model's text encoder holds that model's whole null sequence (``S = 77``: the
  encoding of ``""`` position by position), so the null prompt is exactly what the base model saw.
- multi-vector tags (textual inversion's "vectors per token"): a tag ``t`` owning ``n > 1`` vectors has ``n`` rows,
  ``t`` and ``t#2`` … ``t#n``; ``vectors`` records ``{t: n}`` and a prompt's ``t`` expands to all ``n`` positions.
- ``pooled``   ``(R, P)`` and ``null_pooled`` ``(P,)``, SDXL-family tables only: each tag's pooled vector (the
  second text encoder's projected output) and the null prompt's. A prompt's pooled vector is the weight-weighted
  mean of its tags' (see ``conditioner.encode.encode_pooled``).
"""

from __future__ import annotations

import copy as _copy
import difflib
import fnmatch
import json
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from conditioner.errors import CondvecError, UnknownTagError
from conditioner.factor import FACTORS, FactorRows, take_rows
from conditioner.fileio import atomic_path
from conditioner.layout import LayerSlice, LayerSpec
from conditioner.modes import TableMode, table_mode
from conditioner.parse import TagNormalization
from conditioner.rows import DiskRows
from conditioner.safefile import TableFileError, check_finite, check_safetensors, check_table
from conditioner.schema import TABLE_DTYPES, check_metadata
from conditioner.table_layout import Layout, layout_from

FORMAT_VERSION = 1
#: ModelSpec architecture names of the base-model families (``modelspec.architecture``).
MODELSPEC_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                           "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
METADATA_KEY = "condvec"
SINK, PAD = 0, 1


class TableMismatchError(CondvecError):
    """A table was built for a UNet with other cross-attention layers or dims."""


def _close(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def resolve_groups(layers: list[LayerSpec], groups) -> tuple[list[str], list[int]]:
    """Turn a group choice into group names and each layer's group index.

    Args:
        layers (`list[LayerSpec]`): the UNet's cross-attention layers.
        groups (`str | dict[str, list[str]]`): ``"single"`` (one group), ``"blocks"`` (one per UNet block with
            cross-attention), ``"layers"`` (one per layer), or an explicit mapping ``{group name: [layer names,
            short names or globs]}`` that covers every layer exactly once.

    Returns:
        `(list[str], list[int])`: group names, and for each layer the index of its group.
    """
    if groups == "single":
        return ["all"], [0] * len(layers)
    if groups == "layers":
        return [layer.short for layer in layers], list(range(len(layers)))
    if groups == "blocks":
        names: list[str] = []
        for layer in layers:
            if layer.block not in names:
                names.append(layer.block)
        return names, [names.index(layer.block) for layer in layers]
    if isinstance(groups, dict) or hasattr(groups, "items"):
        names = list(groups.keys())
        assignment: list[int | None] = [None] * len(layers)
        for gi, gname in enumerate(names):
            patterns = groups[gname]
            if isinstance(patterns, str):
                patterns = [patterns]
            for pattern in patterns:
                hit = False
                for li, layer in enumerate(layers):
                    if any(fnmatch.fnmatchcase(n, pattern) for n in (layer.name, layer.short, layer.kohya or "")):
                        if assignment[li] is not None and assignment[li] != gi:
                            raise CondvecError(
                                f"layer {layer.short} is in both group {names[assignment[li]]!r} and {gname!r}"
                            )
                        assignment[li] = gi
                        hit = True
                if not hit:
                    raise CondvecError(
                        f"group {gname!r}: pattern {pattern!r} matches no layer; layers are "
                        f"{', '.join(layer.short for layer in layers)}"
                    )
        missing = [layers[i].short for i, g in enumerate(assignment) if g is None]
        if missing:
            raise CondvecError(f"explicit groups leave layers unassigned: {', '.join(missing)}; assign each one")
        return names, [int(g) for g in assignment]
    raise CondvecError(f"groups must be 'single', 'blocks', 'layers' or a mapping, got {groups!r}")


@dataclass
class TagTable:
    """Learned conditioning for a set of tags; see the module docstring for the tensor layout.

    Build one with :meth:`TagTable.create` (usually through ``unet_patch.table_for_unet``) or :meth:`TagTable.load`.

    Attributes:
        layers (`list[LayerSpec]`): the cross-attention layers the table was built for, in UNet order.
        mode (`str`): ``"vector"`` (key and value sources go through ``to_k`` / ``to_v``) or ``"kv"`` (K and V given
            directly, per layer).
        group_names (`list[str]`): names of the layer groups.
        layer_group (`list[int]`): for each layer, its group index.
        anchors (`list[float]`): timesteps of the anchors, ascending; one anchor = no timestep dependence.
        tags (`list[str]`): tag names, row order.
        data (`torch.Tensor`): ``(R, A, W)`` tag rows.
        values (`dict[str, torch.Tensor]`): separate value sources of split tags, each ``(A, W)``.
        special (`torch.Tensor`): ``(S, A, W)`` sink row and ``S - 1`` padding rows (position-dependent).
        pooled (`torch.Tensor`, *optional*): ``(R, P)`` per-tag pooled vectors (SDXL).
        null_pooled (`torch.Tensor`, *optional*): ``(P,)`` the null prompt's pooled vector (SDXL).
        negative_zeros (`bool`): the base model's pipeline uses zeros, not the null encoding, for an empty negative
            prompt (SDXL's ``force_zeros_for_empty_prompt``); condvec's pipeline does the same.
        use_sink (`bool`): whether sequences start with the sink row.
        pad_to (`int`, *optional*): fixed sequence length (77 for pretrained SD UNets); `None` = dynamic length
            with padding masked out.
        normalization (`TagNormalization`): how tag names are normalised.
        base_model (`dict`): identity of the base model (free-form, e.g. ``{"name": ..., "path": ...}``).
        counts (`dict[str, int]`): per-tag training counts.
        provenance (`list[dict]`): edits applied by ``merge``.
    """

    layers: list[LayerSpec]
    mode: str
    group_names: list[str]
    layer_group: list[int]
    anchors: list[float]
    tags: list[str]
    data: torch.Tensor
    special: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    use_sink: bool = True
    pad_to: int | None = None
    normalization: TagNormalization = field(default_factory=TagNormalization)
    base_model: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    provenance: list[dict] = field(default_factory=list)
    group_kind: str = "layers"
    pooled: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    negative_zeros: bool = False
    vectors: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.lazy = getattr(self, "lazy", False)  # rows memory-mapped from the file (TagTable.open)
        self._index = {name: i for i, name in enumerate(self.tags)}
        for name, count in self.vectors.items():
            missing = [n for n in [name] + extra_rows(name, count) if n not in self._index]
            if missing:
                raise CondvecError(f"multi-vector tag {name!r} lacks its row(s) {', '.join(map(repr, missing))}")
        if len(self._index) != len(self.tags):
            raise CondvecError("duplicate tag names in table")
        table_mode(self.mode)  # raises for an unknown mode
        expected = (len(self.tags), len(self.anchors), self.width)
        if tuple(self.data.shape) != expected:
            raise CondvecError(f"table data has shape {tuple(self.data.shape)}, layout needs {expected}")
        if self.special.dim() != 3 or self.special.shape[0] < 2 or tuple(self.special.shape[1:]) != expected[1:]:
            raise CondvecError(f"special rows have shape {tuple(self.special.shape)}, expected (S >= 2, "
                               f"{expected[1]}, {expected[2]})")
        if (self.pooled is None) != (self.null_pooled is None):
            raise CondvecError("pooled vectors need both per-tag rows and the null prompt's")
        if self.pooled is not None and (self.pooled.dim() != 2 or self.pooled.shape[0] != len(self.tags)
                                        or tuple(self.null_pooled.shape) != (self.pooled.shape[1],)):
            raise CondvecError(f"pooled vectors have shape {tuple(self.pooled.shape)} (null "
                               f"{tuple(self.null_pooled.shape)}), expected ({len(self.tags)}, P) and (P,)")
        if self.values and not self.mode_spec.splittable:
            raise CondvecError("split (key ≠ value) tags exist only in vector mode; a kv row holds its own K and V")

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        layers: list[LayerSpec],
        tags: list[str] | None = None,
        layout: Layout | None = None,
        num_train_timesteps: int = 1000,
        normalization: TagNormalization | None = None,
        base_model: dict | None = None,
        init_std: float = 0.0,
        special_std: float = 0.02,
        seed: int = 0,
        **layout_fields,
    ) -> TagTable:
        """Create an empty (or zero-initialised) table for a UNet's layers.

        Args:
            layers (`list[LayerSpec]`): from ``unet_patch.discover(unet)``.
            tags (`list[str]`, *optional*): initial tag names (normalised here), ``layout.tokens_per_tag`` vectors
                each.
            layout (`Layout`, *optional*, defaults to ``Layout()``): mode, groups, anchors, vectors per tag,
                ``pad_to``, sink (``conditioner.table_layout``); anchors given as a count are spread evenly over
                ``[0, num_train_timesteps - 1]``.
            num_train_timesteps (`int`, defaults to 1000): the scheduler's training timesteps.
            **layout_fields: single layout fields (``groups="single"``, ``pad_to=77``, …) replacing ``layout``'s.
            normalization (`TagNormalization`, *optional*): tag-name normalisation.
            base_model (`dict`, *optional*): identity of the base model, recorded in the file.
            init_std (`float`, defaults to 0.0): std of the normal init of tag rows (0 = zeros).
            special_std (`float`, defaults to 0.02): std of the normal init of the sink and padding rows.
            seed (`int`, defaults to 0): seed for the initialisation.
        """
        layout = layout_from(layout, Layout(), layout_fields)
        spec = table_mode(layout.mode)
        spec.check_layers(layers)
        if not spec.groupable:  # one group per layer, named by the mode
            group_names, layer_group, kind = [layer.short for layer in layers], list(range(len(layers))), spec.name
        else:
            group_names, layer_group = resolve_groups(layers, layout.groups)
            kind = layout.group_kind
        anchors = layout.anchors
        if isinstance(anchors, int):
            top = float(num_train_timesteps - 1)
            anchor_list = [top * i / (anchors - 1) for i in range(anchors)] if anchors > 1 else [0.0]
        else:
            anchor_list = list(anchors)
        normalization = normalization or TagNormalization()
        names = [normalization.apply(t) for t in (tags or [])]
        width = spec.width(layers, len(group_names))
        gen = torch.Generator().manual_seed(seed)
        special = torch.randn(2, len(anchor_list), width, generator=gen) * special_std
        table = cls(
            layers=list(layers), mode=layout.mode, group_names=group_names, layer_group=layer_group,
            anchors=anchor_list, tags=[], data=torch.zeros(0, len(anchor_list), width), special=special,
            use_sink=layout.use_sink, pad_to=layout.pad_to, normalization=normalization,
            base_model=dict(base_model or {}), group_kind=kind,
        )
        if names:
            table.add_tags(names, init="normal" if init_std > 0 else "zeros", std=init_std, seed=seed + 1,
                           vectors=layout.tokens_per_tag)
        return table

    # ----------------------------------------------------------------- layout
    @property
    def width(self) -> int:
        """Packed width of the key part (no value part, no bias)."""
        return self.mode_spec.width(self.layers, len(self.group_names))

    @property
    def mode_spec(self) -> TableMode:
        """What this table's mode decides (``conditioner.modes``): its columns, how layers read them."""
        return table_mode(self.mode)

    @property
    def dim(self) -> int:
        """Vector width per group in vector mode (the UNet's ``cross_attention_dim``)."""
        return self.layers[0].cross_dim

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def group_columns(self, group: int) -> slice:
        """Columns of ``data`` that hold one group (vector mode) or one layer's K and V (kv mode)."""
        return self.mode_spec.group_columns(self.layers, group)

    def layer_slices(self) -> dict[str, LayerSlice]:
        """Where every layer reads its inputs in a packed tensor, keyed by layer name."""
        return self.mode_spec.layer_slices(self.layers, self.layer_group, self.width)

    # ----------------------------------------------------------------- tags
    def __len__(self) -> int:
        return len(self.tags)

    @property
    def names(self) -> list[str]:
        """The tags a prompt can name: every row's tag, a multi-vector tag once (its ``NAME#k`` rows left out)."""
        return [t for t in self.tags if self.vector_owner(t) is None]

    def __contains__(self, name: str) -> bool:
        return self.normalization.apply(name) in self._index

    @property
    def index(self) -> Mapping[str, int]:
        """Normalised tag name → row (read-only view; change tags through :meth:`add_tags` and friends)."""
        return MappingProxyType(self._index)

    def row(self, name: str) -> int:
        """Row index of a tag; unknown names raise ``KeyError`` with close matches."""
        key = self.normalization.apply(name)
        if key not in self._index:
            raise UnknownTagError(f"unknown tag {name!r}{_close(key, self.tags)}")
        return self._index[key]

    def unknown_message(self, names: list[str], shown: int = 8) -> str:
        """One line naming unknown tags: the first ``shown`` with close matches, the rest counted."""
        parts = [f"{n!r}{_close(n, self.tags)}" for n in names[:shown]]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return (f"{len(names)} unknown tags: " if len(names) > 1 else "unknown tag ") + ", ".join(parts) + more + \
            f"; the table has {len(self.tags)} tags"

    def is_split(self, name: str) -> bool:
        """Whether a tag has a separate value source (the result of a key/value swap)."""
        return self.normalization.apply(name) in self.values

    def expand(self, name: str) -> list[int]:
        """Rows of a (normalised) tag name: one, or ``n`` for a multi-vector tag."""
        count = self.vectors.get(name, 1)
        return [self._index[name]] + [self._index[n] for n in extra_rows(name, count)]

    def add_tags(self, names: list[str], init: str = "zeros", std: float = 0.01, seed: int = 0,
                 vectors: int = 1) -> list[int]:
        """Append new tags and return their rows.

        Args:
            names (`list[str]`): tag names (normalised here); existing names raise ``CondvecError``.
            vectors (`int`, defaults to 1): vectors per tag; ``n > 1`` adds rows ``NAME#2`` … ``NAME#n`` too.
            init (`str`, defaults to `"zeros"`): ``"zeros"``, ``"normal"`` (std ``std``), ``"mean"`` (mean of the
                existing rows plus noise of std ``std``), ``"mean:A,B,…"`` (mean of the named tags' rows, no noise),
                or ``"tag:NAME"`` (a copy of tag NAME).
            std (`float`, defaults to 0.01): noise std for ``"normal"`` and ``"mean"``.
            seed (`int`, defaults to 0): noise seed.
        """
        if vectors < 1:
            raise CondvecError(f"vectors per tag must be >= 1, got {vectors}")
        names = [self.normalization.apply(n) for n in names]
        if vectors > 1:
            owners = names
            names = [row for n in owners for row in [n] + extra_rows(n, vectors)]
        dup = [n for n in names if n in self._index]
        if dup or len(set(names)) != len(names):
            raise CondvecError(f"tags already in the table or repeated: {', '.join(repr(n) for n in dup or names)}")
        if any(not n for n in names):
            raise CondvecError("a tag name must not be empty")
        gen = torch.Generator().manual_seed(seed)
        shape = (len(names), self.num_anchors, self.width)
        if init == "zeros":
            rows = torch.zeros(shape)
        elif init == "normal":
            rows = torch.randn(shape, generator=gen) * std
        elif init == "mean":
            base = _mean_rows(self.data).unsqueeze(0) if len(self.tags) else torch.zeros(1, *shape[1:])
            rows = base.expand(shape).clone() + torch.randn(shape, generator=gen) * std
        elif init.startswith("tag:"):
            rows = self.data[self.row(init[4:])].unsqueeze(0).expand(shape).clone()
        elif init.startswith("mean:"):
            chosen = self._init_rows(init)
            rows = self.data[chosen].double().mean(0).to(self.data.dtype).expand(shape).clone()
        else:
            raise CondvecError(f"init must be 'zeros', 'normal', 'mean', 'mean:A,B,…' or 'tag:NAME', got {init!r}")
        start = len(self.tags)
        self.data = _append_rows(self.data, rows)
        if self.pooled is not None:  # new tags start from the null prompt's pooled vector (or their sources')
            if init.startswith("tag:"):
                pooled = self.pooled[self.row(init[4:])]
            elif init.startswith("mean:"):
                pooled = self.pooled[self._init_rows(init)].double().mean(0).to(self.pooled.dtype)
            else:
                pooled = self.null_pooled
            self.pooled = _append_rows(self.pooled, pooled.expand(len(names), -1).clone())
        for n in names:
            self._index[n] = len(self.tags)
            self.tags.append(n)
        if vectors > 1:
            self.vectors.update({n: vectors for n in owners})
        return list(range(start, start + len(names)))

    def _init_rows(self, init: str) -> list[int]:
        names = [n.strip() for n in init[len("mean:"):].split(",") if n.strip()]
        if not names:
            raise CondvecError(f"init {init!r} names no tags: write mean:TAG_A,TAG_B,…")
        return [self.row(n) for n in names]

    def vector_owner(self, name: str) -> str | None:
        """The multi-vector tag that row ``name`` (``OWNER#k``, k >= 2) belongs to, or `None`."""
        base, sep, k = name.rpartition("#")
        if sep and k.isdigit() and 2 <= int(k) <= self.vectors.get(base, 1):
            return base
        return None

    def check_whole_tags(self, names: list[str], verb: str) -> None:
        """Raise ``CondvecError`` if a name is one row (``OWNER#k``) of a multi-vector tag: edits move whole tags.

        Args:
            names (`list[str]`): tag names about to be edited.
            verb (`str`): the edit, for the message (``"drop"``, ``"rename"``, ``"extract"``).
        """
        for n in names:
            owner = self.vector_owner(self.normalization.apply(n))
            if owner is not None:
                raise CondvecError(f"{n!r} is one vector of the multi-vector tag {owner!r} "
                                   f"({self.vectors[owner]} vectors): {verb} {owner!r} instead, its vectors move "
                                   "together")

    def remove_tags(self, names: list[str]) -> None:
        """Remove tags and all their data (rows of every vector, split value sources, counts).

        Raises:
            CondvecError: a name is one row (``OWNER#k``) of a multi-vector tag; drop its owner instead.
        """
        self.check_whole_tags(names, "drop")
        rows = {r for n in names for r in self.expand(self.tags[self.row(n)])}
        for n in names:
            self.vectors.pop(self.tags[self.row(n)], None)
        keep = [i for i in range(len(self.tags)) if i not in rows]
        removed = [self.tags[i] for i in sorted(rows)]
        self.data = take_rows(self.data, keep)
        if self.pooled is not None:
            self.pooled = self.pooled[keep].clone()
        self.tags = [self.tags[i] for i in keep]
        self._index = {name: i for i, name in enumerate(self.tags)}
        for n in removed:
            self.values.pop(n, None)
            self.counts.pop(n, None)

    def rename_tag(self, old: str, new: str) -> None:
        """Rename a tag (with every row of a multi-vector tag), keeping its rows, value source and counts."""
        self.check_whole_tags([old, new], "rename")
        row = self.row(old)
        old_name, new_name = self.tags[row], self.normalization.apply(new)
        if not new_name:
            raise CondvecError("a tag name must not be empty")
        if new_name in self._index and new_name != old_name:
            raise CondvecError(f"tag {new_name!r} already exists")
        count = self.vectors.get(old_name, 1)
        pairs = list(zip([old_name] + extra_rows(old_name, count), [new_name] + extra_rows(new_name, count)))
        taken = [new_row for old_row, new_row in pairs if new_row in self._index and new_row != old_row]
        if taken:
            raise CondvecError(f"tag {taken[0]!r} already exists")
        rows = [self._index.pop(old_row) for old_row, _ in pairs]
        for row, (_, new_row) in zip(rows, pairs):
            self.tags[row] = new_row
            self._index[new_row] = row
        if count > 1:
            self.vectors[new_name] = self.vectors.pop(old_name)
        if old_name in self.values:
            self.values[new_name] = self.values.pop(old_name)
        if old_name in self.counts:
            self.counts[new_name] = self.counts.pop(old_name)

    def set_value_source(self, name: str, value: torch.Tensor | None) -> None:
        """Give a tag a separate value source ``(A, W)`` (vector mode), or tie it again with `None`."""
        key = self.tags[self.row(name)]
        if value is None:
            self.values.pop(key, None)
            return
        if not self.mode_spec.splittable:
            raise CondvecError(f"separate value sources do not exist in {self.mode} mode (only in vector mode)")
        if tuple(value.shape) != (self.num_anchors, self.width):
            raise CondvecError(f"value source must be {(self.num_anchors, self.width)}, got {tuple(value.shape)}")
        self.values[key] = value.detach().to(self.data.dtype).clone()

    def value_source(self, name: str) -> torch.Tensor:
        """The value source ``(A, W)`` of a tag: its own for split tags, its key source otherwise."""
        key = self.tags[self.row(name)]
        return self.values.get(key, self.data[self._index[key]])

    def to(self, device=None, dtype=None) -> TagTable:
        """Move every tensor (in place) and return the table."""
        self.data = self.data.to(device=device, dtype=dtype)
        self.special = self.special.to(device=device, dtype=dtype)
        self.values = {k: v.to(device=device, dtype=dtype) for k, v in self.values.items()}
        if self.pooled is not None:
            self.pooled = self.pooled.to(device=device, dtype=dtype)
            self.null_pooled = self.null_pooled.to(device=device, dtype=dtype)
        return self

    def copy(self) -> TagTable:
        """A deep copy: every field of the table, tensors cloned."""
        return TagTable(**{f.name: _copy.deepcopy(getattr(self, f.name)) for f in fields(self)})

    def skeleton(self) -> TagTable:
        """A copy whose row tensors (``data``, ``pooled``) are shape-only ``meta`` tensors, nothing read from them.

        Edits that move whole rows (drop, rename) run on it without touching a row; :meth:`save_streamed` then writes
        the result, streaming those rows from this table — a memory-mapped table (:meth:`open`) is never held whole.
        """
        rows = {"data": torch.empty(self.data.shape, device="meta"),
                "pooled": None if self.pooled is None else torch.empty(self.pooled.shape, device="meta")}
        return TagTable(**{f.name: rows[f.name] if f.name in rows else _copy.deepcopy(getattr(self, f.name))
                           for f in fields(self)})

    def save_streamed(self, path: str | os.PathLike, source: TagTable, rows: list[int], dtype="fp32",
                      chunk: int | None = None) -> None:
        """Write this table (a :meth:`skeleton` edited by whole rows) with its tag rows read from ``source``.

        Row ``i`` of the file is ``source`` row ``rows[i]``; rows are read, checked (finite, within fp16's range
        when storing fp16) and written ``chunk`` at a time (default: about 32 MiB of fp32 rows), atomically like
        :meth:`save`, so memory stays at one chunk whatever the table's size. Everything else (special rows, split
        value sources, metadata) is this table's own.

        Raises:
            TableFileError / CondvecError: a row is not finite or out of range, or the metadata is invalid; nothing is
                written and an existing file is left as it was.
        """
        if len(rows) != len(self.tags) or tuple(source.data.shape[1:]) != tuple(self.data.shape[1:]):
            raise CondvecError(f"save_streamed: {len(rows)} source rows for {len(self.tags)} tags, or the source's "
                               "rows have another shape")
        storage = _storage_dtype(dtype)
        check_metadata(json.loads(json.dumps(self.metadata())))
        index = torch.tensor(rows, dtype=torch.long)
        origin = getattr(source, "source", None)  # the file a memory-mapped source reads from, for messages
        chunk = chunk or max(1, (32 << 20) // max(1, 4 * math.prod(self.data.shape[1:])))

        def streamed(name: str, tensor: torch.Tensor):
            def chunks():
                for start in range(0, len(rows), chunk):
                    part = tensor[index[start:start + chunk]].float()
                    release_pages(tensor, index[start:start + chunk])  # a copy is in hand: the map's pages may go
                    _check_storable(origin, name, part, storage, self.tags[start:start + len(part)])
                    yield part
            return name, (len(rows), *tensor.shape[1:]), chunks

        def small(name: str, tensor: torch.Tensor):
            _check_storable(None, name, tensor.float(), storage, None)
            return name, tuple(tensor.shape), lambda: iter([tensor])

        parts = [streamed("data", source.data), small("special", self.special)]
        split = sorted(self.values)
        if split:
            parts.append(small("values", torch.stack([self.values[n].detach() for n in split])))
        if self.pooled is not None:
            parts += [streamed("pooled", source.pooled), small("null_pooled", self.null_pooled)]
        title = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        metadata = {METADATA_KEY: json.dumps(self.metadata())} | self.modelspec(title)
        _write_safetensors(path, metadata, parts, storage)

    def replace(self, **changes) -> TagTable:
        """A new table with ``changes`` to its fields, checked as a new table is; other fields are shared, not
        copied (call :meth:`copy` first to keep the original independent)."""
        return replace(self, **changes)

    # ----------------------------------------------------------------- compatibility
    def check_layers(self, layers: list[LayerSpec]) -> None:
        """Raise :class:`TableMismatchError` saying what differs if the table does not fit these layers."""
        mine = {layer.name: layer for layer in self.layers}
        theirs = {layer.name: layer for layer in layers}
        problems = []
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        if missing:
            problems.append(f"{len(missing)} table layer(s) not in the UNet (first: {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} UNet layer(s) not in the table (first: {extra[0]})")
        for name in mine:
            if name in theirs:
                a, b = mine[name], theirs[name]
                for attr in ("cross_dim", "inner_dim", "heads"):
                    if getattr(a, attr) != getattr(b, attr):
                        problems.append(f"{name}: table {attr}={getattr(a, attr)}, UNet {attr}={getattr(b, attr)}")
                        break
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            base = self.base_model.get("name", "an unnamed base model")
            raise TableMismatchError(f"table (built for {base}) does not fit this UNet: {shown}")

    # ----------------------------------------------------------------- save / load
    def metadata(self) -> dict:
        """Everything but the tensors, as JSON-able data (the fields of :data:`_METADATA`)."""
        meta = {"format_version": FORMAT_VERSION}
        for name, (write, _, _) in _METADATA.items():
            meta[name] = write(getattr(self, name))
            if name == "tags":
                meta["split_tags"] = sorted(self.values)
        return meta

    def modelspec(self, title: str) -> dict[str, str]:
        """ModelSpec metadata (``modelspec.*``: title, architecture, date …) that model browsers show; written into
        every table file beside condvec's own metadata, never read back."""
        import datetime

        family = self.base_model.get("family")
        architecture = MODELSPEC_ARCHITECTURES.get(family, family or "unet")
        return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/condvec-table",
                "modelspec.implementation": "condvec", "modelspec.title": title,
                "modelspec.date": datetime.date.today().isoformat(),
                "modelspec.description": f"condvec tag table: {len(self.tags)} tags, {self.mode} mode, "
                                         f"{len(self.group_names)} {self.group_kind} group(s)"}

    def validate(self) -> None:
        """Check everything :meth:`load` checks (shapes, groups, anchors, sizes, finite values).

        Raises:
            TableFileError: (a ``CondvecError``) naming the first problem.
        """
        check_table(self)

    @property
    def disk_backed(self) -> bool:
        """Whether the rows are :class:`~conditioner.rows.DiskRows` (``TagTable.open(path, writable=True)``)."""
        return isinstance(self.data, DiskRows)

    def save(self, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> None:
        """Write the table to one self-contained ``.safetensors`` file, atomically (temp file + rename).

        A disk-backed table (:meth:`open` with ``writable=True``) is streamed into the file a chunk of rows at a
        time (:meth:`save_streamed`), its file rows and the rows held in memory merged.

        Args:
            path (`str` or `os.PathLike`): the file to write.
            dtype (`str` or `torch.dtype`, *optional*): storage precision of every tensor: ``"fp32"`` (the default;
                a disk-backed table's default is the precision of the file it maps), ``"fp16"`` (half the size;
                values beyond ±65504 are refused) or ``"bf16"`` (half the size, fp32's range, 8 bits of mantissa).
                :meth:`load` always returns fp32 tensors for computation.

        Raises:
            TableFileError: (a ``CondvecError``) the table would not load again (NaN or infinite values, a broken
                multi-vector tag, bad sizes); nothing is written and an existing file is left as it was.
        """
        if self.disk_backed:
            self.save_streamed(path, self, list(range(len(self.tags))), dtype=dtype or self.data.stored_dtype)
            return
        self.validate()
        storage = _storage_dtype(dtype or "fp32")
        if isinstance(self.data, FactorRows):
            parts = {f"data.{name}": t for name, t in self.data.factors().items()} | {"special": self.special}
        else:
            parts = {"data": self.data, "special": self.special}
        split = sorted(self.values)
        if split:
            parts["values"] = torch.stack([self.values[n].detach() for n in split])
        if self.pooled is not None:
            parts["pooled"], parts["null_pooled"] = self.pooled, self.null_pooled
        if storage == torch.float16:
            too_big = [name for name, t in parts.items() if t.numel() and float(t.detach().abs().max()) > 65504.0]
            if too_big:
                raise CondvecError(f"table {too_big[0]} holds values beyond fp16's range (±65504): save with "
                                   "dtype='bf16' or 'fp32'")
        tensors = {name: t.detach().to("cpu", storage).contiguous() for name, t in parts.items()}
        title = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        meta = {METADATA_KEY: json.dumps(self.metadata())} | self.modelspec(title)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> TagTable:
        """Open a table file without reading its rows: ``data`` (and SDXL ``pooled``) are memory-mapped.

        Listing tags, encoding a prompt and generating read only the pages of the rows they use, so a table larger
        than memory opens in well under a second. Everything :meth:`load` checks is checked, except scanning every
        row for NaN / infinity up front: the rows a prompt uses are checked when :func:`conditioner.encode`
        gathers them. The mapped tensors are read-only views of the file (stored precision; gathered rows come back
        as fp32); :meth:`load` the table to edit it whole.

        ``writable=True`` makes the rows :class:`~conditioner.rows.DiskRows`: rows written (training steps, new
        tags) are held in memory as fp32 over the read-only map, and :meth:`save` streams the merged table into a
        new file. This is how ``training.table_device: disk`` trains a table larger than memory.

        Raises:
            FileNotFoundError / TableFileError: as :meth:`load`.
        """
        table = cls._read(path, "cpu", lazy=True)
        if writable:
            if isinstance(table.data, FactorRows):
                raise CondvecError(f"{os.fspath(path)!r} holds factorised rows, which are small and read whole: train "
                                   "it in memory (drop training.table_device=disk)")
            table.data = DiskRows(table.data)
            if table.pooled is not None:
                table.pooled = DiskRows(table.pooled)
        return table

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TagTable:
        """Load a table written by :meth:`save`; tensors stored as fp16 or bf16 come back as fp32.

        Raises:
            FileNotFoundError: no such file.
            TableFileError: (a ``CondvecError``) the file is not a condvec table (not safetensors, truncated, missing
                or broken metadata, shapes that contradict it), is from a newer condvec, or holds NaN/inf values.
        """
        return cls._read(path, device, lazy=False)

    @classmethod
    def _read(cls, path: str | os.PathLike, device, lazy: bool) -> TagTable:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"table file {path!r} does not exist")
        header = check_safetensors(path)  # bounds-checked before safetensors allocates anything
        mapped = ("data", "pooled") if lazy and "data" in header else ()  # factorised rows are small: read
        try:
            if lazy:  # no safe_open: it maps the whole file privately, which a file larger than memory is refused
                raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
                names = [k for k in header if k != "__metadata__"]
                tensors = {k: _mapped(path, header, k) if k in mapped else _mapped(path, header, k).clone()
                           for k in names}
            else:
                with safe_open(path, framework="pt", device=str(device)) as f:
                    raw = (f.metadata() or {}).get(METADATA_KEY)
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            message = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            raise TableFileError(f"{path!r} is not a readable .safetensors table ({message})") from err
        tensors = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) and k not in mapped else v
                   for k, v in tensors.items()}
        if raw is None:
            raise TableFileError(f"{path!r} is a .safetensors file without condvec metadata — not a condvec table")
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as err:
            raise TableFileError(f"{path!r}: condvec metadata is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise TableFileError(f"{path!r}: condvec metadata is not a JSON object — not a condvec table")
        odd = [(k, v["dtype"]) for k, v in header.items() if k != "__metadata__" and v["dtype"] not in TABLE_DTYPES]
        if odd:
            raise TableFileError(f"{path!r}: tensor {odd[0][0]!r} is stored as {odd[0][1]}; a table stores "
                                 f"{', '.join(TABLE_DTYPES)}")
        version = meta.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise TableFileError(f"{path!r}: table format version {version} is not supported: it is newer than "
                                 f"this condvec reads (version {FORMAT_VERSION}); upgrade condvec")
        if version != FORMAT_VERSION:
            raise TableFileError(f"{path!r}: table format version {version!r} is not supported (this condvec reads "
                             f"version {FORMAT_VERSION})")
        try:
            check_metadata(meta)
        except CondvecError as err:
            raise TableFileError(f"{path!r}: {err}") from err
        try:
            split = meta.get("split_tags", [])
            values = {}
            if split:
                stacked = tensors["values"]
                if stacked.ndim != 3 or stacked.shape[0] != len(split):
                    raise TableFileError(f"{path!r}: metadata contradicts the tensors: split_tags names {len(split)} "
                                         f"tag(s), tensor 'values' has shape {tuple(stacked.shape)}")
                values = {name: stacked[i].clone() for i, name in enumerate(split)}
            data = FactorRows(*(tensors[f"data.{n}"] for n in FACTORS)) if "data.shared" in tensors \
                else tensors["data"]
            table = cls(data=data, special=tensors["special"], values=values,
                        pooled=tensors.get("pooled"), null_pooled=tensors.get("null_pooled"), **_fields(meta))
        except KeyError as err:
            raise TableFileError(f"{path!r}: table is missing {err}: incomplete or not a condvec table") from err
        except TableFileError:
            raise
        except CondvecError as err:
            raise TableFileError(f"{path!r}: metadata contradicts the tensors ({err})") from err
        table.lazy, table.source = lazy, path
        check_table(table, path, scan_rows=not lazy)
        return table

    # ----------------------------------------------------------------- disk-backed: what memory holds
    def save_held(self, path: str | os.PathLike) -> None:
        """Write what a disk-backed table holds in memory — its held rows (written or appended), special rows,
        split values and metadata, all fp32 — to ``path`` atomically, naming the table file it maps.

        The mapped file is never written; :meth:`open_held` puts the held rows back over it. A checkpoint of
        ``training.table_device: disk`` is this file: its size follows the rows the run touched, not the table's.

        Raises:
            CondvecError: the table is not disk-backed, or a held row is not finite.
        """
        if not self.disk_backed:
            raise CondvecError("save_held: the table is not disk-backed (TagTable.open(path, writable=True))")
        self.__post_init__()
        check_metadata(json.loads(json.dumps(self.metadata())))
        tensors = {"special": self.special.detach().float()}
        for name in ("data", "pooled"):
            rows = getattr(self, name)
            if rows is not None:
                ids, values = rows.held()
                _check_storable(None, name, values, torch.float32, [self.tags[i] for i in ids.tolist()])
                tensors |= {f"{name}.rows": ids, f"{name}.values": values}
        split = sorted(self.values)
        if split:
            tensors["values"] = torch.stack([self.values[n].detach().float() for n in split])
        if self.null_pooled is not None:
            tensors["null_pooled"] = self.null_pooled.detach().float()
        _check_storable(None, "special", tensors["special"], torch.float32, None)
        meta = {METADATA_KEY: json.dumps(self.metadata()), _BASE_KEY: json.dumps(_file_identity(self.source))}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)

    @classmethod
    def open_held(cls, path: str | os.PathLike) -> TagTable:
        """A disk-backed table from :meth:`save_held`'s file: the table file it names, mapped, with the held rows.

        Raises:
            CondvecError: the mapped table file is gone or changed since (size or modification time), or ``path``
                is not such a file.
        """
        from safetensors.torch import load_file

        path = os.fspath(path)
        header = check_safetensors(path)
        raw = (header.get("__metadata__") or {})
        if METADATA_KEY not in raw or _BASE_KEY not in raw:
            raise TableFileError(f"{path!r} is not a file of held table rows (no {_BASE_KEY!r} metadata)")
        meta, base = json.loads(raw[METADATA_KEY]), json.loads(raw[_BASE_KEY])
        check_metadata(meta)
        if not os.path.isfile(base["path"]) or _file_identity(base["path"]) != base:
            raise CondvecError(f"{path!r} holds rows over the table file {base['path']!r}, which is gone or has "
                               "changed since (size or modification time): it is needed as it was; restore it, or "
                               "start the run again")
        mapped = cls.open(base["path"], writable=True)
        if meta["tags"][:len(mapped.tags)] != mapped.tags:
            raise CondvecError(f"{path!r} does not fit the table file {base['path']!r}: its tags differ")
        tensors = load_file(path)
        split = meta.get("split_tags", [])
        fields_ = _fields(meta)
        rows = {}
        for name in ("data", "pooled"):
            source = getattr(mapped, name)
            if source is None:
                rows[name] = None
                continue
            held = DiskRows(source.base, num_rows=len(fields_["tags"]))
            held.hold(tensors[f"{name}.rows"], tensors[f"{name}.values"])
            rows[name] = held
        table = cls(data=rows["data"], pooled=rows["pooled"], special=tensors["special"],
                    values={n: tensors["values"][i].clone() for i, n in enumerate(split)},
                    null_pooled=tensors.get("null_pooled"), **fields_)
        table.lazy, table.source = True, base["path"]
        return table

    def __repr__(self) -> str:
        rows = len(self.tags)
        count = f"{rows} tags" if not self.vectors else f"{len(self.names)} tags in {rows} rows"
        return (f"TagTable({count}, mode={self.mode}, groups={len(self.group_names)} "
                f"({self.group_kind}), anchors={self.num_anchors}, width={self.width}, split={len(self.values)}"
                + (f", pooled={self.pooled.shape[1]}" if self.pooled is not None else "") + ")")


_REQUIRED = object()
_BASE_KEY = "condvec_mapped_file"  # save_held: which table file the held rows lie over


def _file_identity(path: str) -> dict:
    """What identifies a table file's contents cheaply: absolute path, size and modification time (ns)."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fields(meta: dict) -> dict:
    """The table's non-tensor fields from its file metadata (:data:`_METADATA`'s readers and defaults)."""
    return {name: read(meta[name] if default is _REQUIRED else meta.get(name, default))
            for name, (_, read, default) in _METADATA.items()}


_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _check_storable(source: str | None, name: str, tensor: torch.Tensor, storage: torch.dtype,
                    tags: list[str] | None) -> None:
    """Refuse non-finite values (naming ``source``, the file they came from, and the first bad tag), and values fp16
    cannot hold when storing fp16."""
    check_finite(source, name, tensor, tags)
    if storage == torch.float16 and tensor.numel() and float(tensor.abs().max()) > 65504.0:
        raise CondvecError(f"table {name} holds values beyond fp16's range (±65504): save with dtype='bf16' or "
                           "'fp32'")


def _write_safetensors(path, metadata: dict[str, str], parts: list, storage: torch.dtype) -> None:
    """A ``.safetensors`` file written tensor by tensor, chunk by chunk, atomically: ``parts`` are
    ``(name, shape, chunks)`` with ``chunks()`` yielding the tensor's rows in order."""
    import struct

    size = torch.tensor([], dtype=storage).element_size()
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, _ in parts:
        length = math.prod(shape) * size
        header[name] = {"dtype": _DTYPE_CODES[storage], "shape": list(shape),
                        "data_offsets": [offset, offset + length]}
        offset += length
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, chunks in parts:
                written = 0
                for part in chunks():
                    data = part.detach().to("cpu", storage).contiguous().view(torch.uint8).numpy()
                    f.write(memoryview(data))  # no extra copy
                    written += data.size
                if written != math.prod(shape) * size:
                    raise TableFileError(f"table {name}: wrote {written} bytes, expected {math.prod(shape) * size}")


def _same(value):
    return value


def _ints(mapping: dict) -> dict:
    return {k: int(v) for k, v in mapping.items()}


#: Every non-tensor field of a table, as its file stores it: field → (to JSON, from JSON, default when absent, or
#: ``_REQUIRED``), in file order. ``metadata`` and ``load`` are derived from it; ``conditioner.schema`` checks the
#: JSON before anything reads it.
_METADATA = {
    "mode": (_same, str, _REQUIRED),
    "group_kind": (_same, str, "layers"),
    "group_names": (_same, list, _REQUIRED),
    "layer_group": (_same, lambda v: [int(g) for g in v], _REQUIRED),
    "layers": (lambda v: [layer.to_dict() for layer in v], lambda v: [LayerSpec.from_dict(d) for d in v], _REQUIRED),
    "anchors": (_same, lambda v: [float(a) for a in v], _REQUIRED),
    "tags": (_same, list, _REQUIRED),
    "use_sink": (_same, bool, _REQUIRED),
    "pad_to": (_same, _same, None),
    "normalization": (lambda v: v.to_dict(), TagNormalization.from_dict, {}),
    "base_model": (_same, _same, {}),
    "counts": (_same, _ints, {}),
    "provenance": (_same, _same, []),
    "negative_zeros": (_same, bool, False),
    "vectors": (_same, _ints, {}),
}

_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a storage choice (``"fp32"``, ``"fp16"``, ``"bf16"`` or the torch dtype itself)."""
    found = _STORAGE.get(dtype) if isinstance(dtype, str) else dtype if dtype in _STORAGE.values() else None
    if found is None:
        raise CondvecError(f"table storage dtype {dtype!r} is not supported: use one of {', '.join(_STORAGE)}")
    return found


_MAPS: dict[int, tuple] = {}  # id(mapped tensor) → (weak reference to it, its mmap, its byte offset in the file)


def _mapped(path: str, header: dict, name: str) -> torch.Tensor:
    """A read-only memory map of one tensor of a safetensors file: pages are read on use (a shared, read-only
    mapping, so no memory is committed for it however large the file)."""
    import mmap
    import struct
    import warnings

    entry = header[name]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(entry["dtype"])
    if dtype is None:
        raise TableFileError(f"{path!r}: tensor {name!r} is stored as {entry['dtype']}; a table stores "
                             f"{', '.join(TABLE_DTYPES)}")
    size = torch.tensor([], dtype=dtype).element_size()
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        offset = 8 + struct.unpack("<Q", f.read(8))[0] + begin
        if offset % size:
            raise TableFileError(f"{path!r}: tensor {name!r} is not aligned in the file; load() it instead of open()")
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # read-only by design: nothing ever writes through this view
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // size, offset=offset).view(entry["shape"])
    key = id(tensor)
    _MAPS[key] = (weakref.ref(tensor, lambda _, key=key: _MAPS.pop(key, None)), mm, offset)
    return tensor


def release_pages(tensor, rows: torch.Tensor) -> None:
    """Drop the pages of ``rows`` of a mapped tensor (or of :class:`DiskRows`' file rows) from this process's memory.

    Streaming a whole table file through its map would otherwise leave every page it read resident (counted in the
    process's RSS) until the kernel needs the memory; the file's pages stay in the page cache. A no-op for tensors
    that are not mapped.
    """
    import mmap

    tensor = tensor.base if isinstance(tensor, DiskRows) else tensor
    entry = _MAPS.get(id(tensor))
    if entry is None or entry[0]() is not tensor or rows.numel() == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    _, mm, offset = entry
    row_bytes = tensor[0].numel() * tensor.element_size()
    low, high = int(rows.min()), min(int(rows.max()) + 1, tensor.shape[0])
    if high <= low:
        return
    page = mmap.PAGESIZE
    start = (offset + low * row_bytes) // page * page
    stop = offset + high * row_bytes
    mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _append_rows(data, rows: torch.Tensor):
    """``data`` with ``rows`` appended: a new tensor or :class:`FactorRows`, or the same :class:`DiskRows` grown."""
    if isinstance(data, (DiskRows, FactorRows)):
        return data.append(rows)
    if data.device.type == "meta":  # a skeleton: shapes only
        return torch.empty((data.shape[0] + rows.shape[0], *data.shape[1:]), device="meta")
    return torch.cat([data, rows.to(device=data.device, dtype=data.dtype)], 0)


def _mean_rows(data, chunk: int = 4096) -> torch.Tensor:
    """Mean over rows (``(*row)``); disk-backed and factorised rows are read a chunk at a time, never held whole."""
    if isinstance(data, torch.Tensor):
        return data.mean(0)
    total = torch.zeros(data.shape[1:], dtype=torch.float64)
    for start in range(0, data.shape[0], chunk):
        total += data[torch.arange(start, min(start + chunk, data.shape[0]))].double().sum(0)
    return (total / max(1, data.shape[0])).float()


def extra_rows(name: str, count: int) -> list[str]:
    """Names of the rows a multi-vector tag owns besides its own: ``NAME#2`` … ``NAME#count``."""
    return [f"{name}#{k}" for k in range(2, count + 1)]
