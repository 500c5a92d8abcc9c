import pytest

from conditioner import Tag, TagNormalization, parse_prompt


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("red circle, blue square", [Tag("red circle"), Tag("blue square")]),
        ("  Red   Circle ,,  , blue_square  ", [Tag("red circle"), Tag("blue square")]),
        ("(red circle:1.3), x", [Tag("red circle", 1.3), Tag("x")]),
        ("( red circle : 0.5 )", [Tag("red circle", 0.5)]),
        ("(a:2), b, (a:1.5)", [Tag("a", 3.0), Tag("b")]),
        ("a, b, a", [Tag("a"), Tag("b")]),
        ("one\\, two, three", [Tag("one, two"), Tag("three")]),
        ("ganyu \\(genshin impact\\)", [Tag("ganyu (genshin impact)")]),
        ("ganyu (genshin impact)", [Tag("ganyu (genshin impact)")]),
        ("(ganyu \\(genshin\\):1.2)", [Tag("ganyu (genshin)", 1.2)]),
        ("(time\\: noon:2)", [Tag("time: noon", 2.0)]),
        ("", []),
        (" , ,", []),
        ("(a:1e-1)", [Tag("a", 0.1)]),
    ],
)
def test_parse_cases(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("(cat:abc)", "malformed weight 'abc'"),
        ("(cat:1.2", "unbalanced parenthesis"),
        ("cat:1.2)", "unbalanced parenthesis"),
        ("(cat)", "without a weight"),
        ("(cat:0)", "must be a finite number > 0"),
        ("(cat:-1)", "must be a finite number > 0"),
        ("(cat:inf)", "malformed weight"),
        ("(:1.2)", "empty name"),
        ("((cat:1.2):2)", "nested parentheses"),
        ("a (b", "unbalanced parenthesis"),
    ],
)
def test_parse_errors_name_the_problem(prompt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_prompt(prompt)


def test_normalization_options():
    keep = TagNormalization(lowercase=False, underscores="keep")
    assert parse_prompt("Long_Hair, Red  Eyes", keep) == [Tag("Long_Hair"), Tag("Red Eyes")]
    assert parse_prompt("Long_Hair, Red  Eyes") == [Tag("long hair"), Tag("red eyes")]
    with pytest.raises(ValueError, match="underscores must be"):
        TagNormalization(underscores="dash")


def test_any_string_parses_or_raises_value_error():
    import random

    alphabet = "ab ,()\\:._1.2-e"
    rng = random.Random(0)
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        try:
            tags = parse_prompt(prompt)
        except ValueError as err:
            assert str(err) and "\n" not in str(err)
        else:
            assert all(t.name and t.weight > 0 for t in tags)
            assert len({t.name for t in tags}) == len(tags)


def test_non_string_prompt():
    with pytest.raises(ValueError, match="must be a string"):
        parse_prompt(None)


NUMBERS = [("1", 1.0), ("1.3", 1.3), ("-.5e1", -5.0), ("+2.", 2.0), (".25", 0.25), ("1E+2", 100.0),
           ("nan", None), ("inf", None), ("0x10", None), ("1_000", None), (" 1", None), ("1.2.3", None), ("", None),
           ("e3", None), ("1e", None), ("-", None)]


@pytest.mark.parametrize("text, value", NUMBERS)
def test_parse_number_accepts_plain_decimal_literals_only(text, value):
    from conditioner.parse import parse_number

    assert parse_number(text) == value


@pytest.mark.parametrize("text, value", [(t, v) for t, v in NUMBERS if t.strip() == t and t and "*" not in t])
def test_prompt_weights_and_blend_weights_accept_the_same_numbers(text, value):
    from merge.weights import parse_weights

    if value is not None and value > 0:
        assert parse_prompt(f"(cat:{text})") == [Tag("cat", value)]
        assert parse_weights(f"{text}*cat") == [("cat", value)]
    elif value is None:
        with pytest.raises(ValueError, match="malformed weight"):
            parse_prompt(f"(cat:{text})")
        with pytest.raises(ValueError, match="must be WEIGHT\\*TAG"):
            parse_weights(f"{text}*cat")
