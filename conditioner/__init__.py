"""Tag parsing, the tag table, and encoding prompts into one packed conditioning tensor."""

from conditioner.encode import Rows, TokenBatch, encode, encode_pooled, pack, tokenize
from conditioner.layout import LayerSlice, LayerSpec
from conditioner.parse import Tag, TagNormalization, normalize_tag, parse_prompt
from conditioner.regroup import regroup
from conditioner.table import TableMismatchError, TagTable, resolve_groups

__all__ = [
    "LayerSlice",
    "Rows",
    "LayerSpec",
    "TableMismatchError",
    "Tag",
    "TagNormalization",
    "TagTable",
    "TokenBatch",
    "encode",
    "encode_pooled",
    "normalize_tag",
    "pack",
    "parse_prompt",
    "regroup",
    "resolve_groups",
    "tokenize",
]
