"""Pure table → table edits of learned concepts: blend, swap key/value sources, mix, drop, rename, extract, combine.

Every function returns a new :class:`conditioner.TagTable` and never modifies its input; each edit appends a record
to the result's ``provenance``. ``condvec-merge`` (:mod:`merge.cli`) exposes them on the command line.
"""

from __future__ import annotations

from conditioner.lazy import lazy_exports

# Exported names and their modules, imported on first use (conditioner.lazy): --help stays fast.
_EXPORTS = {
    "blend": "merge.concepts",
    "mix": "merge.concepts",
    "swap": "merge.concepts",
    "select_groups": "merge.layers",
    "combine": "merge.tables",
    "combine_streamed": "merge.tables",
    "drop": "merge.tables",
    "extract": "merge.tables",
    "rename": "merge.tables",
    "parse_weights": "merge.weights",
}

__all__ = ["blend", "combine", "combine_streamed", "drop", "extract", "mix", "parse_weights", "rename",
           "select_groups", "swap"]


lazy_exports(__name__, _EXPORTS)
