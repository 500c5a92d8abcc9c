"""Prompt parsing: comma-separated tags with optional weights.

Grammar (every prompt string either parses or raises a one-line ``ValueError``):

- Tags are separated by commas. ``\\,`` is a literal comma inside a tag; ``\\(`` and ``\\)`` are literal
  parentheses (booru tags such as ``ganyu \\(genshin impact\\)``); ``\\\\`` is a literal backslash.
- Surrounding whitespace is stripped, inner whitespace collapsed to one space, empty tags ignored.
- ``(tag:1.3)`` gives a tag a weight. A weight must be a finite number > 0. The weight acts on attention:
  an additive bias ``log(weight)`` on that token's attention logits in every cross-attention layer, so a weight
  of 2 doubles the tag's share of attention before normalisation (exactly like two identical tokens in the sequence).
- Unescaped parentheses are only allowed in a tag that is written entirely as ``(tag:weight)``, or in the middle
  of a tag (``ganyu (genshin impact)``); an unbalanced or malformed weight is an error, never silently fixed.
- Normalisation (see :class:`TagNormalization`): by default lower-case, and underscores become spaces, as booru
  datasets and kohya's trainers expect (``Long_Hair`` → ``long hair``).
- Duplicates: a tag that appears more than once is kept once, at its first position, and its weights multiply
  (``cat, (cat:2)`` → ``cat`` with weight 2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_number(text: str) -> float | None:
    """A plain decimal literal as a float, or `None` when the text is not one.

    Accepted: an optional sign, digits with an optional fraction (or a bare fraction ``.5``), an optional exponent
    (``1e-3``). Not accepted: ``inf``, ``nan``, ``0x10``, ``1_000``, surrounding whitespace — spellings Python's
    ``float`` would take but a prompt or weight expression should not. A literal too large for a float gives
    ``inf``; callers check finiteness.

    Example:
        ```py
        >>> parse_number("1.3"), parse_number("-.5e1"), parse_number("nan")
        (1.3, -5.0, None)
        ```
    """
    return float(text) if _NUMBER.match(text) else None


@dataclass(frozen=True)
class Tag:
    """One tag of a parsed prompt.

    Args:
        name (`str`): the normalised tag name.
        weight (`float`, defaults to 1.0): attention weight, > 0.
    """

    name: str
    weight: float = 1.0


@dataclass
class TagNormalization:
    """How tag names are normalised; a table records the one it was trained with.

    Args:
        lowercase (`bool`, defaults to `True`): fold case (``Red Circle`` → ``red circle``).
        underscores (`str`, defaults to `"space"`): ``"space"`` turns ``_`` into a space (booru style → kohya style),
            ``"keep"`` leaves underscores alone.
    """

    lowercase: bool = True
    underscores: str = field(default="space")

    def __post_init__(self):
        if self.underscores not in ("space", "keep"):
            raise ValueError(f"underscores must be 'space' or 'keep', got {self.underscores!r}")

    def apply(self, name: str) -> str:
        """Normalise one raw tag name (escapes already resolved)."""
        if self.underscores == "space":
            name = name.replace("_", " ")
        name = _WS.sub(" ", name).strip()
        if self.lowercase:
            name = name.lower()
        return name

    def to_dict(self) -> dict:
        return {"lowercase": self.lowercase, "underscores": self.underscores}

    @classmethod
    def from_dict(cls, data: dict) -> TagNormalization:
        return cls(lowercase=bool(data.get("lowercase", True)), underscores=str(data.get("underscores", "space")))


def _split(prompt: str) -> list[list[tuple[str, bool]]]:
    """Split on unescaped commas; each piece is a list of (char, escaped) pairs."""
    pieces: list[list[tuple[str, bool]]] = [[]]
    i = 0
    while i < len(prompt):
        ch = prompt[i]
        if ch == "\\":
            if i + 1 < len(prompt) and prompt[i + 1] in ",()\\:":
                pieces[-1].append((prompt[i + 1], True))
                i += 2
                continue
            pieces[-1].append((ch, True))  # a lone backslash is literal
        elif ch == ",":
            pieces.append([])
        else:
            pieces[-1].append((ch, False))
        i += 1
    return pieces


def _strip(chars: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    start, end = 0, len(chars)
    while start < end and not chars[start][1] and chars[start][0].isspace():
        start += 1
    while end > start and not chars[end - 1][1] and chars[end - 1][0].isspace():
        end -= 1
    return chars[start:end]


def _text(chars: list[tuple[str, bool]]) -> str:
    return "".join(c for c, _ in chars)


def _parse_piece(chars: list[tuple[str, bool]], raw: str) -> tuple[str, float] | None:
    chars = _strip(chars)
    if not chars:
        return None
    opens = [i for i, (c, esc) in enumerate(chars) if c == "(" and not esc]
    closes = [i for i, (c, esc) in enumerate(chars) if c == ")" and not esc]
    starts_weighted = chars[0] == ("(", False)
    ends_weighted = chars[-1] == (")", False)
    if starts_weighted and ends_weighted:
        inner = chars[1:-1]
        colons = [i for i, (c, esc) in enumerate(inner) if c == ":" and not esc]
        if not colons:
            raise ValueError(
                f"tag {raw.strip()!r} is in parentheses without a weight: write '(tag:1.2)', "
                "or escape literal parentheses as '\\(' and '\\)'"
            )
        name_chars, weight_text = inner[: colons[-1]], _text(inner[colons[-1] + 1 :]).strip()
        if any(c in "()" and not esc for c, esc in name_chars):
            raise ValueError(f"nested parentheses in tag {raw.strip()!r}: nesting is not supported, use '(tag:1.2)'")
        weight = parse_number(weight_text)
        if weight is None:
            raise ValueError(
                f"malformed weight {weight_text!r} in tag {raw.strip()!r}: expected a number, e.g. '(tag:1.2)'"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight {weight_text} in tag {raw.strip()!r} must be a finite number > 0")
        name = _text(_strip(name_chars))
        if not name:
            raise ValueError(f"weighted tag {raw.strip()!r} has an empty name")
        return name, weight
    depth = 0
    for c, esc in chars:
        if not esc and c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                break
    if depth != 0 or len(opens) != len(closes):
        raise ValueError(
            f"unbalanced parenthesis in tag {raw.strip()!r}: escape literal parentheses as '\\(' and '\\)'"
        )
    return _text(chars), 1.0


def parse_prompt(prompt: str, normalization: TagNormalization | None = None) -> list[Tag]:
    """Parse a prompt into tags.

    Args:
        prompt (`str`): comma-separated tags, e.g. ``"elephant, glass, (sitting:1.2)"``.
        normalization (`TagNormalization`, *optional*): how names are normalised; defaults to lower-case with
            underscores as spaces.

    Returns:
        `list[Tag]`: tags in prompt order, duplicates merged (first position kept, weights multiplied).

    Raises:
        ValueError: a malformed weight or unbalanced parenthesis, naming the offending tag.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    normalization = normalization or TagNormalization()
    order: list[str] = []
    weights: dict[str, float] = {}
    for chars in _split(prompt):
        parsed = _parse_piece(chars, _text(chars))
        if parsed is None:
            continue
        name = normalization.apply(parsed[0])
        if not name:
            continue
        if name in weights:
            weights[name] *= parsed[1]
        else:
            order.append(name)
            weights[name] = parsed[1]
    return [Tag(name, weights[name]) for name in order]


def normalize_tag(name: str, normalization: TagNormalization | None = None) -> str:
    """Normalise a single tag name the way :func:`parse_prompt` does (no weight syntax)."""
    return (normalization or TagNormalization()).apply(name)
