"""Prompt parsing: comma-separated tags with A1111 / ComfyUI emphasis syntax.

Grammar (every prompt string either parses or raises a one-line ``CondvecError``):

- Tags are separated by commas. Surrounding whitespace is stripped, inner whitespace collapsed to one space,
  empty tags ignored.
- Emphasis, as A1111 and ComfyUI write it, on whole tags or groups of tags: ``(tag)`` multiplies the weight by
  1.1 per level (``((tag))`` = 1.21), ``[tag]`` divides it by 1.1, ``(tag:1.3)`` multiplies it by 1.3, and a group
  weighs each of its tags (``(red hair, blue eyes:1.2)``; ``((a), b)`` gives ``a`` 1.21 and ``b`` 1.1). A weight
  must be a finite number > 0.
- Escapes: ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets (booru tags such as
  ``ganyu \\(genshin impact\\)``), ``\\,`` a literal comma, ``\\:`` a literal colon, ``\\\\`` a literal
  backslash. Brackets in the middle of a tag (``ganyu (genshin impact)``) are part of its name, as in booru tag
  lists; emphasis must enclose whole tags.
- ``BREAK`` (A1111's 75-token chunk break: uppercase, a word of its own, as in ``a, BREAK, b`` or ``a BREAK b``)
  separates tags like a comma; condvec has no token limit, so it has no other meaning (said once per process).
  ComfyUI's ``embedding:NAME`` is the tag ``NAME``. ``<lora:…>``, ``<lyco:…>`` and ``<hypernet:…>`` are refused in
  one line: condvec loads no networks from prompts. A1111's prompt editing ``[a:b:when]`` and alternation
  ``[a|b]`` are refused too.
- What a weight does is condvec's own: an additive bias ``log(weight)`` on that tag's attention logits in every
  cross-attention layer, so a weight of 2 doubles the tag's share of attention before normalisation (exactly like
  two identical tokens in the sequence). Only the syntax is shared with A1111.
- Normalisation (see :class:`TagNormalization`): by default lower-case, and underscores become spaces, as booru
  datasets and kohya's trainers expect (``Long_Hair`` → ``long hair``).
- Duplicates: a tag that appears more than once is kept once, at its first position, and its weights multiply
  (``cat, (cat:2)`` → ``cat`` with weight 2).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

from conditioner.errors import CondvecError

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
            raise CondvecError(f"underscores must be 'space' or 'keep', got {self.underscores!r}")

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


EMPHASIS = 1.1  # A1111's factor per bracket level
_NETWORK = re.compile(r"(?<!\\)<\s*(lora|lyco|hypernet|lycoris)\s*:[^>]*>", re.IGNORECASE)
_BREAK = re.compile(r"\bBREAK\b")  # A1111: uppercase, a word of its own (commas or spaces around it)
_SEP = (",", "sep")  # a tag boundary in the scanned characters (commas and BREAK)
_said_break = False


def _scan(prompt: str) -> tuple[list[tuple[str, bool]], list[float]]:
    """Resolve escapes and brackets: the prompt's characters (char, escaped) and each one's emphasis weight.

    Commas become :data:`_SEP`. Brackets that open a tag (only whitespace since the last separator or bracket) are
    emphasis; other brackets are literal characters of the tag's name and must balance within it.
    """
    chars: list[tuple[str, bool]] = []
    weights: list[float] = []
    stack: list[tuple[str, int]] = []  # ("(" | "[" | "lit(" | "lit[", index in chars where the group starts)
    i = 0

    def at_tag_start() -> bool:
        j = len(chars) - 1
        while j >= 0 and chars[j] == (" ", False):
            j -= 1
        opened = stack[-1][1] if stack and not stack[-1][0].startswith("lit") else 0
        return j < 0 or chars[j] == _SEP or j < opened

    while i < len(prompt):
        ch = prompt[i]
        if ch == "\\" and i + 1 < len(prompt) and prompt[i + 1] in ",()[]\\:<":
            chars.append((prompt[i + 1], True))
            weights.append(1.0)
            i += 2
            continue
        if ch in "([":
            if at_tag_start():
                stack.append((ch, len(chars)))
            else:
                stack.append(("lit" + ch, len(chars)))
                chars.append((ch, False))
                weights.append(1.0)
        elif ch in ")]":
            want = "(" if ch == ")" else "["
            if not stack or stack[-1][0][-1] != want:
                raise CondvecError(f"unbalanced bracket {ch!r} at character {i + 1} of {prompt!r}: escape literal "
                                   f"brackets as '\\{ch}'")
            kind, start = stack.pop()
            if kind.startswith("lit"):
                chars.append((ch, False))
                weights.append(1.0)
            else:
                factor = _group_weight(chars, start, kind, prompt)
                del weights[len(chars):]  # an explicit ":weight" was cut from the group's text
                for k in range(start, len(weights)):
                    weights[k] *= factor
                rest = prompt[i + 1:].lstrip(" ")
                if rest and rest[0] not in ",)]:" and not rest.startswith("BREAK"):
                    raise CondvecError(f"emphasis must enclose whole tags: {prompt!r} continues a tag after "
                                       f"'{ch}' at character {i + 1} (condvec weighs tags, not words)")
        elif ch == ",":
            if stack and stack[-1][0].startswith("lit"):
                raise CondvecError(f"unbalanced bracket {stack[-1][0][-1]!r} in a tag of {prompt!r}: escape literal "
                                   "brackets as '\\(' and '\\)'")
            chars.append(_SEP)
            weights.append(1.0)
        else:
            chars.append((" " if ch.isspace() else ch, False))
            weights.append(1.0)
        i += 1
    if stack:
        raise CondvecError(f"unbalanced bracket {stack[-1][0][-1]!r} in {prompt!r}: close it, or escape literal "
                           "brackets as '\\(' and '\\)'")
    return chars, weights


def _group_weight(chars: list[tuple[str, bool]], start: int, kind: str, prompt: str) -> float:
    """The factor of a closed emphasis group: 1.1, 1/1.1, or an explicit ``:weight`` (removed from ``chars``)."""
    inner = chars[start:]
    colons = [k for k, (c, esc) in enumerate(inner) if c == ":" and not esc]
    if kind == "[":
        if colons or any(c == "|" and not esc for c, esc in inner):
            raise CondvecError(f"A1111 prompt editing '[a:b:when]' and alternation '[a|b]' are not supported in "
                               f"condvec prompts: {prompt!r}")
        return 1.0 / EMPHASIS
    if colons:
        text = "".join(c for c, _ in inner[colons[-1] + 1:]).strip()
        number = parse_number(text)
        if number is not None:
            if not "".join(c for c, esc in inner[:colons[-1]] if esc != "sep").strip():
                raise CondvecError(f"a weighted group in {prompt!r} has an empty name")
            if not math.isfinite(number) or number <= 0:
                raise CondvecError(f"weight {text} in {prompt!r} must be a finite number > 0")
            del chars[start + colons[-1]:]
            return number
        before = "".join(c for c, _ in inner[:colons[-1]]).split()
        if " " not in text and not (before and before[-1].lower() == "embedding"):
            raise CondvecError(f"malformed weight {text!r} in {prompt!r}: expected a number, e.g. '(tag:1.2)'")
    return EMPHASIS


def parse_prompt(prompt: str, normalization: TagNormalization | None = None) -> list[Tag]:
    """Parse a prompt into tags.

    Args:
        prompt (`str`): comma-separated tags, e.g. ``"elephant, glass, (sitting:1.2), ((masterpiece))"``.
        normalization (`TagNormalization`, *optional*): how names are normalised; defaults to lower-case with
            underscores as spaces.

    Returns:
        `list[Tag]`: tags in prompt order, duplicates merged (first position kept, weights multiplied).

    Raises:
        CondvecError: a malformed weight, an unbalanced bracket, emphasis inside a tag, a LoRA / prompt-editing
            syntax condvec does not run, naming the offending part.
    """
    global _said_break
    if not isinstance(prompt, str):
        raise CondvecError(f"a prompt must be a string, got {type(prompt).__name__}")
    network = _NETWORK.search(prompt)
    if network:
        raise CondvecError(f"{network.group(0)!r}: condvec has no LoRA / network loader in prompts; load LoRA "
                           "weights into the UNet with diffusers' pipe.load_lora_weights(...) and leave them out of "
                           "the prompt")
    if _BREAK.search(prompt):
        if not _said_break:
            warnings.warn("BREAK (A1111's 75-token chunk break) only separates tags here: condvec prompts have no "
                          "token limit", stacklevel=2)
            _said_break = True
        prompt = _BREAK.sub(",", prompt)
    normalization = normalization or TagNormalization()
    chars, weights = _scan(prompt)
    order: list[str] = []
    merged: dict[str, float] = {}
    pieces: list[tuple[list[tuple[str, bool]], list[float]]] = [([], [])]
    for pair, w in zip(chars, weights):
        if pair == _SEP:
            pieces.append(([], []))
        else:
            pieces[-1][0].append(pair)
            pieces[-1][1].append(w)
    for piece, ws in pieces:
        lead = next((k for k, (c, esc) in enumerate(piece) if esc or not c.isspace()), len(piece))
        end = next((k for k in range(len(piece), 0, -1) if piece[k - 1][1] or not piece[k - 1][0].isspace()), 0)
        piece, tag_weights = piece[lead:end], ws[lead:end]
        if not piece:
            continue
        body = "".join(c for c, _ in piece)
        weight = tag_weights[0]
        if any(abs(w - weight) > 1e-12 * weight for w in tag_weights):
            raise CondvecError(f"emphasis must enclose whole tags: {body!r} has parts of different weights "
                               "(condvec weighs tags, not words)")
        if body.lower().startswith("embedding:") and not piece[9][1]:  # ComfyUI's syntax names a tag
            body = re.sub(r"\.(pt|safetensors|bin)$", "", body[len("embedding:"):].strip())
        name = normalization.apply(body)
        if not name:
            if weight != 1.0:
                raise CondvecError(f"a weighted group in {prompt!r} holds no tag")
            continue
        if name in merged:
            merged[name] *= weight
        else:
            order.append(name)
            merged[name] = weight
    return [Tag(name, merged[name]) for name in order]


def normalize_tag(name: str, normalization: TagNormalization | None = None) -> str:
    """Normalise a single tag name the way :func:`parse_prompt` does (no weight syntax)."""
    return (normalization or TagNormalization()).apply(name)
