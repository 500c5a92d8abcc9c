"""Tag parsing, the tag table, and encoding prompts into one packed conditioning tensor."""

from __future__ import annotations

from conditioner.lazy import lazy_exports

# Exported names and their modules, imported on first use (conditioner.lazy): --help stays fast.
_EXPORTS = {
    "Rows": "conditioner.encode",
    "TokenBatch": "conditioner.encode",
    "encode": "conditioner.encode",
    "encode_pooled": "conditioner.encode",
    "pack": "conditioner.encode",
    "tokenize": "conditioner.encode",
    "LayerSlice": "conditioner.layout",
    "LayerSpec": "conditioner.layout",
    "Layout": "conditioner.table_layout",
    "Tag": "conditioner.parse",
    "TagNormalization": "conditioner.parse",
    "normalize_tag": "conditioner.parse",
    "parse_prompt": "conditioner.parse",
    "regroup": "conditioner.regroup",
    "factorise": "conditioner.factor",
    "unfactorise": "conditioner.factor",
    "TableMismatchError": "conditioner.table",
    "TagTable": "conditioner.table",
    "resolve_groups": "conditioner.table",
}

__all__ = [
    "LayerSlice",
    "Rows",
    "LayerSpec",
    "Layout",
    "TableMismatchError",
    "Tag",
    "TagNormalization",
    "TagTable",
    "TokenBatch",
    "encode",
    "encode_pooled",
    "factorise",
    "normalize_tag",
    "pack",
    "parse_prompt",
    "regroup",
    "resolve_groups",
    "tokenize",
    "unfactorise",
]


lazy_exports(__name__, _EXPORTS)
