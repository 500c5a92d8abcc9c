"""Pure table → table edits of learned concepts: blend, swap key/value sources, mix, drop, rename, extract, combine.

Every function returns a new :class:`conditioner.TagTable` and never modifies its input; each edit appends a record
to the result's ``provenance``. ``condvec-merge`` (:mod:`merge.cli`) exposes them on the command line.
"""

from merge.concepts import blend, mix, swap
from merge.layers import select_groups
from merge.tables import combine, drop, extract, rename
from merge.weights import parse_weights

__all__ = ["blend", "combine", "drop", "extract", "mix", "parse_weights", "rename", "select_groups", "swap"]
