"""Hostile inputs, one class per test: each is one line on stderr, exit code 2, and nothing written or replaced."""

import logging
import os
import stat

import pytest
from PIL import Image
from test_pipeline import _pipe
from testkit import make_unet

from conditioner.captions import MAX_SKIP_LINES
from conditioner.errors import CondvecError
from unet_patch import table_for_unet


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "model"
    _pipe(False).save_pretrained(path)
    return path


@pytest.fixture
def table_file(tmp_path):
    path = tmp_path / "table.safetensors"
    table_for_unet(make_unet(), tags=["cat", "dog", "glass"], init_std=1.0, base_name="tiny").save(path)
    return path


def test_generate_never_replaces_an_image_without_force(model_dir, tmp_path, capsys):
    from unet_patch.cli import main

    args = ["--model", str(model_dir), "--prompt", "red circle", "--steps", "1"]
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own picture")
    assert main([*args, "--out", str(out)]) == 2
    assert "already exists" in _one_line(capsys, "condvec-generate") and out.read_bytes() == b"the user's own picture"
    grid = tmp_path / "grid.png"  # with --num 3 a numbered image counts as much as the grid
    (tmp_path / "grid-1.png").write_bytes(b"kept")
    assert main([*args, "--num", "3", "--out", str(grid)]) == 2
    assert "grid-1.png" in _one_line(capsys, "condvec-generate")
    assert (tmp_path / "grid-1.png").read_bytes() == b"kept" and not grid.exists()
    assert main([*args, "--out", str(out), "--force"]) == 0
    assert Image.open(out).size == (8, 8)


@pytest.mark.parametrize("seed", [str(2 ** 64), str(10 ** 30), "-1"])
def test_generate_seed_outside_64_bits(model_dir, tmp_path, capsys, seed):
    from unet_patch.cli import main

    assert main(["--model", str(model_dir), "--prompt", "red circle", "--steps", "1", "--seed", seed,
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--seed must be between 0 and 2**64 - 1" in _one_line(capsys, "condvec-generate")
    assert list(tmp_path.iterdir()) == []


def test_in_place_refuses_a_read_only_table_unless_forced(table_file, capsys):
    from merge.cli import main

    before = table_file.read_bytes()
    table_file.chmod(0o444)  # as root os.access says writable: the mode bits are what the user set
    try:
        assert main(["rename", str(table_file), "cat", "kitten", "--in-place"]) == 2
        assert "is marked read-only; pass --force" in _one_line(capsys, "condvec-merge")
        assert table_file.read_bytes() == before and not stat.S_IMODE(table_file.stat().st_mode) & 0o222
        assert main(["rename", str(table_file), "cat", "kitten", "--in-place", "--force"]) == 0
        assert table_file.read_bytes() != before
    finally:
        table_file.chmod(0o644)


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(\w+\s?)*$", r"(a|aa)*b", r"^(x*)*y"])
def test_drop_refuses_patterns_that_backtrack_exponentially(table_file, tmp_path, capsys, pattern):
    from merge.cli import main

    assert main(["drop", str(table_file), "--match", pattern, "-o", str(tmp_path / "out.safetensors")]) == 2
    assert "can take exponential time" in _one_line(capsys, "condvec-merge")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("pattern, name", [(r"^(cat|dog)$", "dog"), (r"^gl", "glass"), (r"(ab){3}|a{2,5}", "aaa"),
                                           (r"(?:do)+g", "dodog")])
def test_drop_keeps_ordinary_patterns(pattern, name):
    """Alternation without a repeat around it, fixed counts and a repeated group that holds no repeat are kept."""
    from merge.tables import compile_match

    assert compile_match(pattern).search(name)


def test_drop_pattern_length_is_bounded(table_file, tmp_path, capsys):
    from merge.cli import main

    assert main(["drop", str(table_file), "--match", "a" * 5000, "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "the limit is 1000" in _one_line(capsys, "condvec-merge")


def test_thousands_of_unknown_tags_are_one_short_line(table_file, tmp_path, capsys, model_dir):
    from merge.cli import main as merge
    from unet_patch.cli import main as generate

    names = [f"tag{i}" for i in range(5000)]
    assert merge(["extract", str(table_file), *names, "-o", str(tmp_path / "o.safetensors")]) == 2
    err = _one_line(capsys, "condvec-merge")
    assert "5000 unknown tags: 'tag0'" in err and "and 4992 more" in err and len(err) < 400
    assert generate(["--model", str(model_dir), "--prompt", ", ".join(names), "--steps", "1",
                     "--out", str(tmp_path / "o.png")]) == 2
    assert len(_one_line(capsys, "condvec-generate")) < 500 and list(tmp_path.iterdir()) == [table_file]


def _dataset(root, count: int, image: bytes | None, caption: str) -> None:
    root.mkdir()
    for i in range(count):
        path = root / f"{i:03d}.png"
        if image is None:
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_bytes(image)
        (root / f"{i:03d}.txt").write_text(caption)


@pytest.mark.parametrize("image, caption, reason", [
    (b"", "cat, dog", "unreadable"),  # zero-byte images
    (None, "(:1.2), (:0.5)", "with a bad caption"),  # captions of weights only
])
def test_a_dataset_with_no_usable_image_is_one_line_and_no_warnings(tmp_path, caplog, image, caption, reason):
    from train.data import scan_dataset

    _dataset(tmp_path / "data", 30, image, caption)
    with caplog.at_level(logging.WARNING, logger="train.data"), pytest.raises(CondvecError) as raised:
        scan_dataset(str(tmp_path / "data"))
    message = str(raised.value)
    assert "\n" not in message and f"all 30 skipped (30 {reason}" in message and "first 000.png" in message
    assert caplog.records == []


def test_skip_warnings_are_capped_with_a_count(tmp_path, caplog):
    from train.data import scan_dataset

    _dataset(tmp_path / "data", MAX_SKIP_LINES + 15, b"", "cat")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "good.png")
    (tmp_path / "data" / "good.txt").write_text("cat")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        assert len(scan_dataset(str(tmp_path / "data"))) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == MAX_SKIP_LINES + 2 and lines[-2] == "… and 15 more skipped images"
    assert lines[-1].startswith(f"skipped {MAX_SKIP_LINES + 15} of {MAX_SKIP_LINES + 16} images")


@pytest.mark.parametrize("flags, message", [
    (["--tokens-per-tag", "1000"], "--tokens-per-tag must be at most 75"),
    (["--context-rows", "500"], "--context-rows must be at most 76"),
])
def test_bootstrap_vectors_per_tag_are_bounded_by_the_encoder(tmp_path, capsys, flags, message):
    from bootstrap.cli import main

    tags = tmp_path / "tags.txt"
    tags.write_text("red\n")
    out = tmp_path / "t.safetensors"
    assert main([os.fspath(tmp_path / "no-model"), "-o", str(out), "--tags", str(tags), *flags]) == 2
    assert message in _one_line(capsys, "condvec-bootstrap") and not out.exists()
