"""Property tests: the prompt parser and the table loader answer any input with a result or a documented error."""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import make_unet

from conditioner.errors import CondvecError
from conditioner.parse import Tag, TagNormalization, parse_prompt
from conditioner.safefile import TableFileError
from conditioner.table import TagTable
from unet_patch import discover

# Each property runs in a few seconds; a hang or a runaway allocation trips the deadline.
_COMMON = {"database": None, "deadline": timedelta(seconds=2), "suppress_health_check": [HealthCheck.too_slow]}
FAST = settings(max_examples=300, **_COMMON)
LOADER = settings(max_examples=120, **_COMMON)

# Text biased towards the parser's special characters, so every branch (escapes, weights, nesting) is reached.
_SYNTAX = st.text(alphabet=st.sampled_from(list(",()\\:._ -+eE0123456789aBc\t\n")), max_size=60)
PROMPTS = st.one_of(st.text(max_size=80), _SYNTAX)


@FAST
@given(PROMPTS, st.booleans(), st.sampled_from(["space", "keep"]))
def test_parse_prompt_returns_tags_or_raises_condvec_error(prompt, lowercase, underscores):
    normalization = TagNormalization(lowercase=lowercase, underscores=underscores)
    try:
        tags = parse_prompt(prompt, normalization)
    except CondvecError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    names = [tag.name for tag in tags]
    assert len(set(names)) == len(names)
    for tag in tags:
        assert isinstance(tag, Tag) and tag.name and normalization.apply(tag.name) == tag.name
        assert math.isfinite(tag.weight) and tag.weight > 0


def _escape(name: str) -> str:
    return "".join("\\" + c if c in ",()[]\\:<" else c for c in name)


def _format(tags: list[Tag]) -> str:
    """A prompt that writes ``tags`` back: names escaped, weights other than 1 as ``(name:weight)``."""
    return ", ".join(_escape(t.name) if t.weight == 1.0 else f"({_escape(t.name)}:{t.weight!r})" for t in tags)


@FAST
@given(PROMPTS)
def test_parsed_prompt_written_back_parses_to_the_same_tags(prompt):
    try:
        tags = parse_prompt(prompt)
    except CondvecError:
        return
    assert parse_prompt(_format(tags)) == tags


@FAST
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20),
                          st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)), max_size=8))
def test_formatted_tags_parse_back_exactly(pairs):
    normalization = TagNormalization()
    tags, seen = [], set()
    for raw, weight in pairs:
        name = normalization.apply(raw)
        if name and name not in seen:
            seen.add(name)
            tags.append(Tag(name, weight))
    assert parse_prompt(_format(tags)) == tags


# ---------------------------------------------------------------------------------------------------- table loader


@pytest.fixture(scope="module")
def table_bytes() -> bytes:
    table = TagTable.create(discover(make_unet()), tags=["red circle", "blue square", "cat"], init_std=1.0,
                            anchors=2)
    table.set_value_source("cat", torch.ones(table.num_anchors, table.width))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        table.save(path)
        return path.read_bytes()


def _load(data: bytes) -> TagTable | None:
    """Load ``data`` as a table file; `None` for a documented error, any other exception propagates."""
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return TagTable.load(path)
    except TableFileError as err:
        assert "\n" not in str(err)
        return None
    finally:
        os.unlink(path)


def test_the_valid_file_loads(table_bytes):
    assert _load(table_bytes).tags == ["red circle", "blue square", "cat"]


@LOADER
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_with_a_table_file_error(data):
    assert _load(data) is None


@LOADER
@given(st.binary(min_size=8, max_size=64), st.binary(max_size=512))
def test_random_header_length_and_body_are_refused(prefix, body):
    assert _load(prefix + body) is None


@LOADER
@given(st.data())
def test_truncated_table_is_refused(table_bytes, data):
    cut = data.draw(st.integers(min_value=0, max_value=len(table_bytes) - 1))
    assert _load(table_bytes[:cut]) is None


@LOADER
@given(st.data())
def test_bit_flipped_table_loads_or_is_refused(table_bytes, data):
    flips = data.draw(st.lists(st.integers(min_value=0, max_value=len(table_bytes) * 8 - 1), min_size=1, max_size=3))
    damaged = bytearray(table_bytes)
    for bit in flips:
        damaged[bit // 8] ^= 1 << (bit % 8)
    table = _load(bytes(damaged))
    if table is not None:  # a flip in a tensor value or a free-form string can leave a valid table
        assert torch.isfinite(table.data).all() and torch.isfinite(table.special).all()
        assert table.data.shape == (len(table.tags), table.num_anchors, table.width)
