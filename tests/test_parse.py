import re
import warnings

import pytest

from conditioner import Tag, TagNormalization, parse_prompt
from conditioner.errors import CondvecError


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
        ("(cat:1.2", "unbalanced bracket '('"),
        ("cat:1.2)", "unbalanced bracket ')'"),
        ("[cat", "unbalanced bracket '['"),
        ("(cat]", "unbalanced bracket ']'"),
        ("(cat:0)", "must be a finite number > 0"),
        ("(cat:-1)", "must be a finite number > 0"),
        ("(cat:inf)", "malformed weight"),
        ("(:1.2)", "empty name"),
        ("a (b", "unbalanced bracket '('"),
        ("(red) hat", "emphasis must enclose whole tags"),
        ("<lora:add_detail:0.8>, cat", "condvec has no LoRA / network loader in prompts"),
        ("<lyco:x:1>", "condvec has no LoRA / network loader in prompts"),
        ("[cat:dog:0.5]", "prompt editing '[a:b:when]' and alternation '[a|b]' are not supported"),
        ("[cat|dog]", "prompt editing '[a:b:when]' and alternation '[a|b]' are not supported"),
    ],
)
def test_parse_errors_name_the_problem(prompt, message):
    with pytest.raises(CondvecError, match=re.escape(message)):
        parse_prompt(prompt)


def test_normalization_options():
    keep = TagNormalization(lowercase=False, underscores="keep")
    assert parse_prompt("Long_Hair, Red  Eyes", keep) == [Tag("Long_Hair"), Tag("Red Eyes")]
    assert parse_prompt("Long_Hair, Red  Eyes") == [Tag("long hair"), Tag("red eyes")]
    with pytest.raises(CondvecError, match="underscores must be"):
        TagNormalization(underscores="dash")


def test_any_string_parses_or_raises_value_error():
    import random

    alphabet = "ab ,()\\:._1.2-e"
    rng = random.Random(0)
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        try:
            tags = parse_prompt(prompt)
        except CondvecError as err:
            assert str(err) and "\n" not in str(err)
        else:
            assert all(t.name and t.weight > 0 for t in tags)
            assert len({t.name for t in tags}) == len(tags)


def test_non_string_prompt():
    with pytest.raises(CondvecError, match="must be a string"):
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
        with pytest.raises(CondvecError, match="malformed weight"):
            parse_prompt(f"(cat:{text})")
        with pytest.raises(CondvecError, match="must be WEIGHT\\*TAG"):
            parse_weights(f"{text}*cat")


# Prompts as A1111 / ComfyUI users write them (booru tag lists, emphasis-heavy prompts), and what they mean here:
# the A1111 weights (1.1 per "(" level, ÷1.1 per "[" level, ":w" multiplies), one weight per tag.
A1111_CORPUS = [
    ("masterpiece, best quality, 1girl, solo, long_hair, blue_eyes",
     [("masterpiece", 1.0), ("best quality", 1.0), ("1girl", 1.0), ("solo", 1.0), ("long hair", 1.0),
      ("blue eyes", 1.0)]),
    ("((masterpiece)), (best quality:1.2), [lowres]",
     [("masterpiece", 1.21), ("best quality", 1.2), ("lowres", 1 / 1.1)]),
    ("(((ultra detailed))), [[blurry]]", [("ultra detailed", 1.331), ("blurry", 1 / 1.21)]),
    ("(red hair, blue eyes:1.2), smile", [("red hair", 1.2), ("blue eyes", 1.2), ("smile", 1.0)]),
    ("((red hair), blue eyes), smile", [("red hair", 1.21), ("blue eyes", 1.1), ("smile", 1.0)]),
    ("((cat:1.2):2)", [("cat", 2.4)]),
    ("( smiling : 0.8 ), open mouth", [("smiling", 0.8), ("open mouth", 1.0)]),
    ("ganyu \\(genshin impact\\), 1girl", [("ganyu (genshin impact)", 1.0), ("1girl", 1.0)]),
    ("(ganyu \\(genshin impact\\):1.3)", [("ganyu (genshin impact)", 1.3)]),
    ("hatsune miku (vocaloid), twintails", [("hatsune miku (vocaloid)", 1.0), ("twintails", 1.0)]),
    ("1girl, red dress BREAK 1boy, blue suit",
     [("1girl", 1.0), ("red dress", 1.0), ("1boy", 1.0), ("blue suit", 1.0)]),
    # BREAK between commas, as A1111 users write it (its parser splits on r"\s*\bBREAK\b\s*")
    ("masterpiece, 1girl, red hair, BREAK, blue sky, clouds",
     [("masterpiece", 1.0), ("1girl", 1.0), ("red hair", 1.0), ("blue sky", 1.0), ("clouds", 1.0)]),
    ("a cat,BREAK,a dog", [("a cat", 1.0), ("a dog", 1.0)]),
    ("BREAK, landscape, BREAK", [("landscape", 1.0)]),
    ("(red hair:1.2), BREAK (blue eyes:0.8)", [("red hair", 1.2), ("blue eyes", 0.8)]),
    ("break, heartbreak, BREAKFAST, BREAK_DANCE", [("break", 1.0), ("heartbreak", 1.0), ("breakfast", 1.0),
                                                  ("break dance", 1.0)]),
    ("embedding:EasyNegative, (embedding:bad_hands.pt:1.3)", [("easynegative", 1.0), ("bad hands", 1.3)]),
    ("score_9, score_8_up, (rating_safe:1.1)", [("score 9", 1.0), ("score 8 up", 1.0), ("rating safe", 1.1)]),
    ("(time\\: noon:2), cat, (cat)", [("time: noon", 2.0), ("cat", 1.1)]),
    ("\\[not emphasis\\], a\\, b", [("[not emphasis]", 1.0), ("a, b", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_CORPUS)
def test_a1111_prompts_parse_with_a1111_weights(prompt, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [(t.name, t.weight) for t in parse_prompt(prompt)]
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_break_is_said_once_and_separates_tags():
    import conditioner.parse as parse

    parse._said_break = False
    with pytest.warns(UserWarning, match="BREAK .* only separates tags here"):
        assert [t.name for t in parse_prompt("a BREAK b")] == ["a", "b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [t.name for t in parse_prompt("c BREAK d")] == ["c", "d"]
    assert [t.name for t in parse_prompt("breakfast, BREAKING")] == ["breakfast", "breaking"]
