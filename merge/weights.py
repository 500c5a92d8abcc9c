"""Weight expressions for ``blend``: ``"0.6*cat + 0.4*dog"``, ``"cat - 0.5*dog"``.

Grammar: terms joined by ``+`` or ``-``; a term is ``WEIGHT*TAG``, ``TAG*WEIGHT`` or a bare ``TAG`` (weight 1).
``-`` is an operator only at the start, after whitespace or after ``+``, so tags such as ``t-shirt`` keep their
hyphen; write ``cat - dog``, not ``cat-dog``, to subtract. Tag names must not contain ``+`` or ``*``.
"""

from __future__ import annotations

import math
import re

from conditioner.errors import CondvecError
from conditioner.parse import parse_number

# "+" except inside a number's exponent ("1e+3"); "-" only where it cannot be part of a tag name or an exponent
# (start, after whitespace or after "+")
_OPERATOR = re.compile(r"\s*((?<!\d[eE])\+|(?<![^\s+])-)\s*")


def parse_weights(expression: str) -> list[tuple[str, float]]:
    """Parse a weight expression into ``(tag, weight)`` terms, in the order written.

    Args:
        expression (`str`): e.g. ``"0.6*cat + 0.4*dog"``, ``"cat - 0.5*dog"`` or ``"dog*0.3 + cat*0.7"``.

    Returns:
        `list[tuple[str, float]]`: the raw tag names (not yet normalised) and their weights.

    Raises:
        CondvecError: the expression does not parse (empty term, missing tag, a weight that is not a finite number,
            more than one ``*`` in a term); the message names the offending part.

    Example:
        ```py
        >>> parse_weights("0.6*cat + 0.4*dog")
        [('cat', 0.6), ('dog', 0.4)]
        ```
    """
    if not isinstance(expression, str) or not expression.strip():
        raise CondvecError(f"empty weight expression {expression!r}; write e.g. '0.6*cat + 0.4*dog'")
    pieces = _OPERATOR.split(expression.strip())
    # re.split with one group alternates text and operator: [text, op, text, op, text, ...]
    terms: list[tuple[str, float]] = []
    sign = 1.0
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            sign = -sign if piece == "-" else sign
            continue
        if not piece.strip():
            # only a chain of signs may leave an empty text between operators ("a + -0.5*b", "-b")
            if i == len(pieces) - 1:
                raise CondvecError(f"weight expression {expression!r} ends with an operator; a tag is missing")
            if i > 0 and pieces[i + 1] == "+":
                raise CondvecError(f"weight expression {expression!r} has an empty term between two operators")
            continue
        name, weight = _term(piece.strip(), expression)
        terms.append((name, sign * weight))
        sign = 1.0
    return terms


def _term(term: str, expression: str) -> tuple[str, float]:
    parts = [part.strip() for part in term.split("*")]
    if len(parts) == 1:
        if parse_number(parts[0]) is not None:
            raise CondvecError(f"weight expression {expression!r}: term {term!r} is a number without a tag; "
                               "write WEIGHT*TAG")
        return parts[0], 1.0
    if len(parts) > 2:
        raise CondvecError(f"weight expression {expression!r}: term {term!r} has more than one '*'; write WEIGHT*TAG "
                           "(to subtract, put spaces around '-': 'a - 0.5*b')")
    left, right = parts
    left_number, right_number = parse_number(left), parse_number(right)
    if left_number is not None and right and right_number is None:
        number, weight, name = left, left_number, right
    elif right_number is not None and left and left_number is None:
        number, weight, name = right, right_number, left
    else:
        raise CondvecError(f"weight expression {expression!r}: term {term!r} must be WEIGHT*TAG with a finite number "
                           "as WEIGHT and a tag name")
    if not math.isfinite(weight):
        raise CondvecError(f"weight expression {expression!r}: weight {number!r} is not a finite number")
    return name, weight
