"""Table modes: what a table's rows hold and where each layer reads its inputs in a packed tensor.

The one module that compares mode names. Everything else asks a mode what it can do (``table.mode_spec``):

- ``vector``: a row holds vectors in the UNet's ``cross_attention_dim`` — one per layer group — that go through each
  layer's own ``to_k`` / ``to_v`` (like CLIP's output). Layers can share a group, tags can be split (key source ≠
  value source), and the table can be regrouped.
- ``kv``: a row holds each layer's K and V directly (``2 · inner_dim`` columns per layer, ``to_k`` / ``to_v``
  bypassed). One group per layer; no split tags (a row already has its own K and V).

Adding a mode means one more class here.
"""

from __future__ import annotations

import torch

from conditioner.errors import CondvecError
from conditioner.layout import LayerSlice, LayerSpec


class TableMode:
    """What a table mode decides. Subclasses set the flags and implement the layout."""

    #: the name stored in table files and configs
    name = ""
    #: rows hold each layer's K and V (``to_k`` / ``to_v`` bypassed) rather than vectors fed through them
    direct_kv = False
    #: layers may share a group (``single``, ``blocks``, a mapping), and tables may be regrouped
    groupable = True
    #: tags may be split (key source ≠ value source), e.g. by a key/value swap
    splittable = True

    def check_layers(self, layers: list[LayerSpec]) -> None:
        """Raise if a UNet with these layers cannot hold a table of this mode."""

    def width(self, layers: list[LayerSpec], num_groups: int) -> int:
        """Columns of one row (the key part of a packed tensor)."""
        raise NotImplementedError

    def group_columns(self, layers: list[LayerSpec], group: int) -> slice:
        """The columns of one group of a row."""
        raise NotImplementedError

    def layer_slices(self, layers: list[LayerSpec], layer_group: list[int], width: int) -> dict[str, LayerSlice]:
        """Where every layer reads its inputs, keyed by layer name."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VectorMode(TableMode):
    """Vectors per layer group, through each layer's ``to_k`` / ``to_v``."""

    name = "vector"

    def check_layers(self, layers: list[LayerSpec]) -> None:
        dims = sorted({layer.cross_dim for layer in layers})
        if len(dims) > 1:
            raise CondvecError(f"vector mode needs one cross_attention_dim for all layers, this UNet has {dims}: "
                               "use mode='kv'")

    def width(self, layers: list[LayerSpec], num_groups: int) -> int:
        return num_groups * layers[0].cross_dim

    def group_columns(self, layers: list[LayerSpec], group: int) -> slice:
        dim = layers[0].cross_dim
        return slice(group * dim, (group + 1) * dim)

    def layer_slices(self, layers: list[LayerSpec], layer_group: list[int], width: int) -> dict[str, LayerSlice]:
        out = {}
        for layer, group in zip(layers, layer_group):
            cols = self.group_columns(layers, group)
            out[layer.name] = LayerSlice(self.name, cols.start, cols.stop, cols.start, width)
        return out


class KVMode(TableMode):
    """Each layer's K and V, given directly."""

    name = "kv"
    direct_kv = True
    groupable = False
    splittable = False

    def width(self, layers: list[LayerSpec], num_groups: int) -> int:
        return sum(2 * layer.inner_dim for layer in layers)

    def group_columns(self, layers: list[LayerSpec], group: int) -> slice:
        start = sum(2 * layer.inner_dim for layer in layers[:group])
        return slice(start, start + 2 * layers[group].inner_dim)

    def layer_slices(self, layers: list[LayerSpec], layer_group: list[int], width: int) -> dict[str, LayerSlice]:
        out = {}
        for li, layer in enumerate(layers):
            cols = self.group_columns(layers, li)
            out[layer.name] = LayerSlice(self.name, cols.start, cols.start + layer.inner_dim,
                                         cols.start + layer.inner_dim, width, direct_kv=True)
        return out


MODES: dict[str, TableMode] = {mode.name: mode for mode in (VectorMode(), KVMode())}
#: Names of the modes, and the mode of a table when none is asked for.
VECTOR, KV = VectorMode.name, KVMode.name
DEFAULT_MODE = VECTOR


def table_mode(name: str) -> TableMode:
    """The mode called ``name`` (``vector`` or ``kv``).

    Raises:
        CondvecError: for any other name, listing the modes.
    """
    try:
        return MODES[name]
    except (KeyError, TypeError) as err:
        raise CondvecError(f"unknown table mode {name!r}; choose from {', '.join(MODES)}") from err


def sources(layer_slice: LayerSlice, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's ``(key source, value source, bias)`` in a packed tensor (see :class:`LayerSlice`).

    The packed width says what the tensor carries: ``base_width`` (plain), ``+ base_width`` (split tags' value
    sources, vector mode only), ``+ 1`` (the bias channel of weighted tags).

    Raises:
        CondvecError: the width fits none of these (the tensor was packed for another table).
    """
    s, width = layer_slice, packed.shape[-1]
    base = s.base_width
    splits = not s.direct_kv
    if width in (base, base + 1):
        split = False
    elif splits and width in (2 * base, 2 * base + 1):
        split = True
    else:
        raise CondvecError(
            f"packed conditioning has width {width}, but this {s.mode}-mode table packs {base} columns "
            f"(+{base} for split tags, +1 for the bias channel): encode prompts with the table that was installed")
    bias = packed[..., -1] if width == (2 * base if split else base) + 1 else None
    key_src = packed[..., s.key_start:s.key_end]
    if s.direct_kv:
        value_src = packed[..., s.value_start:s.value_start + (s.key_end - s.key_start)]
    elif split:
        value_src = packed[..., base + s.key_start:base + s.key_end]
    else:
        value_src = key_src
    return key_src, value_src, bias
