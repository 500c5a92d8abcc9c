"""The table file's metadata schema, checked field by field before anything trusts it.

Every field of a table's JSON metadata is declared once here with its type and range; :func:`check_metadata` is the
one check :meth:`conditioner.table.TagTable.load` runs before it builds a table, so a file with a float
``cross_dim``, an integer tag name, a non-list provenance or an absurd ``pad_to`` is one clear error instead of a
crash (or an allocation of gigabytes) somewhere later. Sizes are bounded here, shapes against the tensors actually
present by :meth:`TagTable.validate`.
"""

from __future__ import annotations

import math

from conditioner.errors import CondvecError
from conditioner.modes import MODES

#: Layer groupings by name; an explicit ``{group: [layers]}`` mapping is the other kind (:func:`resolve_groups`).
GROUPINGS = ("single", "blocks", "layers")
#: The prompt sequence length of SD's text encoders (BOS, 75 tokens, EOS): what pretrained SD UNets were trained
#: with, and the ``pad_to`` of tables made from a pretrained model.
SD_SEQUENCE = 77


#: Longest fixed sequence a table may pad to (SD uses 77; A1111's chunked prompts use multiples of 75 + 2).
MAX_PAD_TO = 1024
#: Most vectors one tag may own (textual inversion's "vectors per token").
MAX_VECTORS = 1024
#: Largest layer width (cross_attention_dim, inner dim) or head count a table may describe.
MAX_DIM = 1 << 16
#: Tensor dtypes a table file may store (everything is computed in float32).
TABLE_DTYPES = ("F32", "F16", "BF16")


def _is_int(v) -> bool:
    return type(v) is int


def _is_real(v) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _int_in(low: int, high: int):
    return lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]"


def _list_of(check, what: str, nonempty: bool = False):
    return (lambda v: isinstance(v, list) and (v or not nonempty) and all(check(x) for x in v),
            f"a {'non-empty ' if nonempty else ''}list of {what}")


_STR = (lambda v: isinstance(v, str), "a string")
_BOOL = (lambda v: type(v) is bool, "true or false")
_DICT = (lambda v: isinstance(v, dict), "a JSON object")

_LAYER_FIELDS = {
    "name": _STR, "short": _STR, "block": _STR,
    "cross_dim": _int_in(1, MAX_DIM), "inner_dim": _int_in(1, MAX_DIM), "heads": _int_in(1, MAX_DIM),
}

#: field → (required, (check, what it must be)).
FIELDS = {
    "format_version": (True, (_is_int, "an integer")),
    "mode": (True, (lambda v: isinstance(v, str) and v in MODES, " or ".join(repr(m) for m in MODES))),
    "group_kind": (False, _STR),
    "group_names": (True, _list_of(lambda v: isinstance(v, str), "strings", nonempty=True)),
    "layer_group": (True, _list_of(_is_int, "integers", nonempty=True)),
    "layers": (True, _list_of(lambda v: isinstance(v, dict), "layer objects", nonempty=True)),
    "anchors": (True, _list_of(_is_real, "finite numbers", nonempty=True)),
    "tags": (True, _list_of(lambda v: isinstance(v, str) and v != "", "non-empty strings")),
    "split_tags": (False, _list_of(lambda v: isinstance(v, str), "strings")),
    "use_sink": (True, _BOOL),
    "pad_to": (False, (lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_PAD_TO),
                       f"null or an integer in [1, {MAX_PAD_TO}]")),
    "normalization": (False, _DICT),
    "base_model": (False, _DICT),
    "counts": (False, (lambda v: isinstance(v, dict) and all(_is_int(c) and c >= 0 for c in v.values()),
                       "an object of tag → count >= 0")),
    "provenance": (False, _list_of(lambda v: isinstance(v, dict), "objects")),
    "negative_zeros": (False, _BOOL),
    "vectors": (False, (lambda v: isinstance(v, dict) and all(_is_int(c) and 2 <= c <= MAX_VECTORS
                                                              for c in v.values()),
                        f"an object of tag → vector count in [2, {MAX_VECTORS}]")),
}


def check_metadata(meta: dict) -> None:
    """Raise ``CondvecError`` naming the first metadata field of the wrong type or out of range.

    Args:
        meta (`dict`): a table's parsed JSON metadata.
    """
    for key, (required, (check, what)) in FIELDS.items():
        if key not in meta:
            if required:
                raise CondvecError(f"metadata field {key!r} is missing")
            continue
        if not check(meta[key]):
            raise CondvecError(f"metadata field {key!r} must be {what}, got {_short(meta[key])}")
    for i, layer in enumerate(meta["layers"]):
        for key, (check, what) in _LAYER_FIELDS.items():
            if key not in layer:
                raise CondvecError(f"layer {i} of the metadata has no {key!r}")
            if not check(layer[key]):
                raise CondvecError(f"layer {i}: {key!r} must be {what}, got {_short(layer[key])}")
        if layer.get("kohya") is not None and not isinstance(layer["kohya"], str):
            raise CondvecError(f"layer {i}: 'kohya' must be a string or null, got {_short(layer['kohya'])}")
    anchors = meta["anchors"]
    if any(b <= a for a, b in zip(anchors, anchors[1:])):
        raise CondvecError(f"metadata field 'anchors' must be strictly ascending timesteps, got {_short(anchors)}")
    normalization = meta.get("normalization", {})
    if "lowercase" in normalization and type(normalization["lowercase"]) is not bool:
        raise CondvecError("metadata field 'normalization.lowercase' must be true or false")
    if "underscores" in normalization and not isinstance(normalization["underscores"], str):
        raise CondvecError("metadata field 'normalization.underscores' must be a string")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
