"""Tag parsing, the tag table, and encoding prompts into one packed conditioning tensor."""

from conditioner.encode import TokenBatch, encode, pack, tokenize
from conditioner.layout import LayerSlice, LayerSpec
from conditioner.parse import Tag, TagNormalization, normalize_tag, parse_prompt
from conditioner.table import TableMismatchError, TagTable, resolve_groups

__all__ = [
    "LayerSlice",
    "LayerSpec",
    "TableMismatchError",
    "Tag",
    "TagNormalization",
    "TagTable",
    "TokenBatch",
    "encode",
    "normalize_tag",
    "pack",
    "parse_prompt",
    "resolve_groups",
    "tokenize",
]
