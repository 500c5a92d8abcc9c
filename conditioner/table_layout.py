"""A table's layout (its shape): the one home of its defaults and rules.

Every entry point that makes or extends a table takes a :class:`Layout` — ``TagTable.create`` and
``unet_patch.table_for_unet``, ``bootstrap.bootstrap_table`` / ``add_bootstrapped_tags`` and ``condvec-bootstrap``,
the trainer's ``table`` section (merges and the ComfyUI nodes make no table: they read the file's) — so a default
(``groups``, ``pad_to``, vectors per tag) is written once, here, and a bad value is refused here with the field it
belongs to, before any model is loaded.

Three starting points, each a documented set of defaults:

- ``Layout()``: a table that learns from scratch — one vector per tag per cross-attention layer (``layers``),
  dynamic sequence length;
- ``Layout.pretrained()``: a table made from a pretrained model's own text encoder — one group (CLIP computes one
  vector per tag, the same for every layer), SD's 77 positions;
- ``Layout.distilled()``: the pretrained layout with each tag as a block of its 3 token vectors and 16 context rows
  from its EOS and padding (what ``condvec-bootstrap --distill`` teaches to compose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from conditioner.errors import CondvecError
from conditioner.modes import DEFAULT_MODE, MODES, table_mode
from conditioner.schema import GROUPINGS, MAX_PAD_TO, MAX_VECTORS, SD_SEQUENCE

#: Groups of a table that learns (``TagTable.create``, ``condvec-train``): one vector per tag per layer.
DEFAULT_GROUPS = "layers"
#: Groups of a table bootstrapped from CLIP alone (``condvec-bootstrap``): CLIP computes one vector per tag, the same
#: for every layer, so one group holds it exactly; regroup or train to give layers their own.
BOOTSTRAP_GROUPS = "single"

#: Most timestep anchors a table may have.
MAX_ANCHORS = 1000
#: Vectors per tag of a distilled table: its token vectors, then its context rows (measured in BENCHMARKS.md,
#: "Distillation").
DISTILL_TOKENS, DISTILL_CONTEXT = 3, 16


class LayoutError(CondvecError):
    """A layout field out of range; ``field`` names it, so each caller can say it its own way (a config key, a flag).
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class Layout:
    """How a table is laid out.

    Attributes:
        mode (`str`, defaults to ``"vector"``): ``"vector"`` (vectors through each layer's ``to_k`` / ``to_v``) or
            ``"kv"`` (each layer's K and V directly).
        groups (`str | Mapping`, defaults to ``"layers"``): ``"single"``, ``"blocks"``, ``"layers"`` or an explicit
            ``{group: [layer names or globs]}`` mapping (ignored in kv mode: one group per layer).
        anchors (`int | tuple[float, ...]`, defaults to 1): timestep anchors — a count spread evenly over the
            scheduler's timesteps, or their explicit timesteps.
        tokens_per_tag (`int`, defaults to 1): vectors per new tag (textual inversion's "vectors per token").
        context_rows (`int`, defaults to 0): more vectors per new tag after its tokens, from its EOS and padding
            positions in the model's text encoder (the tag's share of what CLIP spreads over them).
        pad_to (`int | None`, defaults to `None`): fixed sequence length (77 for pretrained SD UNets); `None` =
            as long as the prompt.
        use_sink (`bool`, defaults to `True`): start every sequence with the sink row (the BOS position that
            pretrained SD UNets attend to).
    """

    mode: str = DEFAULT_MODE
    groups: str | Mapping = DEFAULT_GROUPS
    anchors: int | tuple[float, ...] = 1
    tokens_per_tag: int = 1
    context_rows: int = 0
    pad_to: int | None = None
    use_sink: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise LayoutError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.groups, str):
            if self.groups not in GROUPINGS:
                raise LayoutError("groups", f"must be one of {', '.join(GROUPINGS)} or a mapping of group → layers, "
                                  f"got {self.groups!r}")
        elif not (isinstance(self.groups, Mapping) and self.groups):
            raise LayoutError("groups", f"must be one of {', '.join(GROUPINGS)} or a non-empty mapping of group → "
                              f"layers, got {self.groups!r}")
        if isinstance(self.anchors, bool) or not isinstance(self.anchors, int | tuple | list):
            raise LayoutError("anchors", f"must be a count or a list of timesteps, got {self.anchors!r}")
        if isinstance(self.anchors, int):
            if not 1 <= self.anchors <= MAX_ANCHORS:
                raise LayoutError("anchors", f"must be in [1, {MAX_ANCHORS}], got {self.anchors}")
        else:
            values = tuple(float(a) for a in self.anchors)
            if (not values or len(values) > MAX_ANCHORS or not all(math.isfinite(a) for a in values)
                    or any(b <= a for a, b in zip(values, values[1:]))):
                raise LayoutError("anchors", f"must be strictly ascending timesteps, got {list(self.anchors)}")
            object.__setattr__(self, "anchors", values)
        for name, low in (("tokens_per_tag", 1), ("context_rows", 0)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= MAX_VECTORS:
                raise LayoutError(name, f"must be a whole number in [{low}, {MAX_VECTORS}], got {value!r}")
        if self.tokens_per_tag + self.context_rows > MAX_VECTORS:
            raise LayoutError("tokens_per_tag", f"plus context_rows must be at most {MAX_VECTORS}, got "
                              f"{self.tokens_per_tag} + {self.context_rows}")
        if self.pad_to is not None and (type(self.pad_to) is not int or not 1 <= self.pad_to <= MAX_PAD_TO):
            raise LayoutError("pad_to", f"must be null or a whole number in [1, {MAX_PAD_TO}], got {self.pad_to!r}")
        if type(self.use_sink) is not bool:
            raise LayoutError("use_sink", f"must be true or false, got {self.use_sink!r}")

    @classmethod
    def pretrained(cls, **changes) -> Layout:
        """The layout of a table made from a pretrained model's own text encoder: one group, SD's 77 positions.

        A tag's vectors are read from the encoder's positions, so ``tokens_per_tag`` is bounded by them (the
        sequence less BOS and EOS) and ``context_rows`` by the EOS and padding positions.
        """
        layout = cls(**{"groups": BOOTSTRAP_GROUPS, "pad_to": SD_SEQUENCE} | changes)
        if layout.tokens_per_tag > SD_SEQUENCE - 2:
            raise LayoutError("tokens_per_tag", f"must be at most {SD_SEQUENCE - 2} (the text encoder's "
                              f"{SD_SEQUENCE} positions less BOS and EOS), got {layout.tokens_per_tag}")
        if layout.context_rows > SD_SEQUENCE - 1:
            raise LayoutError("context_rows", f"must be at most {SD_SEQUENCE - 1} (the text encoder's EOS and "
                              f"padding positions), got {layout.context_rows}")
        return layout

    @classmethod
    def distilled(cls, **changes) -> Layout:
        """The pretrained layout with each tag a block of token vectors and context rows, ready for distillation."""
        return cls.pretrained(**{"tokens_per_tag": DISTILL_TOKENS, "context_rows": DISTILL_CONTEXT} | changes)

    @classmethod
    def of(cls, table) -> Layout:
        """The layout of an existing table (new tags added to it get its vectors per tag)."""
        boot = table.base_model.get("bootstrap") if isinstance(table.base_model, dict) else None
        boot = boot if isinstance(boot, dict) else {}
        own = {key: boot[key] for key in ("tokens_per_tag", "context_rows") if type(boot.get(key)) is int}
        if not table_mode(table.mode).groupable:  # one group per layer, named by the mode
            groups = DEFAULT_GROUPS
        elif table.group_kind in GROUPINGS:
            groups = table.group_kind
        else:  # a custom grouping, as the mapping that rebuilds it
            groups = {name: [layer.name for layer, g in zip(table.layers, table.layer_group) if g == i]
                      for i, name in enumerate(table.group_names)}
        return cls(mode=table.mode, groups=groups, anchors=tuple(table.anchors),
                   pad_to=table.pad_to, use_sink=table.use_sink, **own)

    @property
    def vectors(self) -> int:
        """Vectors of each new tag: its token vectors, then its context rows."""
        return self.tokens_per_tag + self.context_rows

    @property
    def group_kind(self) -> str:
        """``groups`` as a table records it: a grouping name, or ``"custom"`` for a mapping."""
        return self.groups if isinstance(self.groups, str) else "custom"

    def replace(self, **changes) -> Layout:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)


#: The names of a layout's fields (what ``Layout(**…)`` takes).
LAYOUT_FIELDS = tuple(f.name for f in fields(Layout))


def layout_from(layout: Layout | None, base: Layout, changes: dict) -> Layout:
    """``layout`` (or ``base``) with keyword ``changes`` that name layout fields; other keywords are a TypeError."""
    unknown = sorted(set(changes) - set(LAYOUT_FIELDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; layout fields are "
                        f"{', '.join(LAYOUT_FIELDS)}")
    return replace(layout or base, **changes) if changes else (layout or base)
