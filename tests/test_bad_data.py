"""Bad data never stops a run with a traceback nor leaves it silently without images.

Each bad case is built in ``tmp_path`` next to a good image: with ``on_bad_image="skip"`` the good image is kept and
the bad one is skipped with exactly one warning line naming it and the reason, plus a count at the end; with
``on_bad_image="error"`` the scan raises a one-line ``CondvecError`` naming the file and the reason. Valid but unusual
images (grayscale, alpha, palette, 16-bit) just work.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin

from conditioner.errors import CondvecError
from train.data import MAX_CAPTION_BYTES, MAX_TAG_CHARS, MAX_TAGS, Item, assign_buckets, load_image, scan_dataset

LOGGER = "train.data"


def _png_bytes(size=(16, 16), colour=(200, 30, 60), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG", **save)
    return buffer.getvalue()


def _jpeg_bytes(size=(64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG file whose header claims ``width x height`` RGB pixels (a decompression bomb's size)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _good(root: Path, name: str = "good.png", caption: str = "cat, dog") -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes())
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _bad_image(data: bytes) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        (root / "bad.png").write_bytes(data)
        (root / "bad.txt").write_text("cat", encoding="utf-8")
        return "bad.png"
    return build


def _bad_caption(caption: bytes | None, image: bytes | None = None) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        (root / "bad.png").write_bytes(image or _png_bytes())
        if caption is not None:
            (root / "bad.txt").write_bytes(caption)
        return "bad.png"
    return build


def _truncated_jpeg(root: Path) -> str:
    data = _jpeg_bytes()
    (root / "bad.jpg").write_bytes(data[: len(data) * 2 // 3])
    (root / "bad.txt").write_text("cat", encoding="utf-8")
    return "bad.jpg"


def _self_loop(root: Path) -> str:
    os.symlink("bad.png", root / "bad.png")  # bad.png -> bad.png: ELOOP on open
    (root / "bad.txt").write_text("cat", encoding="utf-8")
    return "bad.png"


def _dangling(root: Path) -> str:
    os.symlink(root / "gone.png", root / "bad.png")
    (root / "bad.txt").write_text("cat", encoding="utf-8")
    return "bad.png"


_PNG = _png_bytes()
# name: (builder returning the bad file's path relative to the root, skip category, reason pattern)
BAD_CASES = {
    "corrupt image": (_bad_image(b"this is not an image at all"), "unreadable", r"unreadable image"),
    "truncated png": (_bad_image(_PNG[: len(_PNG) // 2]), "unreadable", r"unreadable image"),
    "png with a flipped byte": (_bad_image(_PNG[:60] + bytes([_PNG[60] ^ 0xFF]) + _PNG[61:]), "unreadable",
                                r"unreadable image"),
    "truncated jpeg": (_truncated_jpeg, "unreadable", r"unreadable image .*truncated"),
    "empty file": (_bad_image(b""), "unreadable", r"unreadable image"),
    "zero-size header": (_bad_image(_png_claiming(0, 16)), "unreadable", r"unreadable image|0x16"),
    "20000x20000 header": (_bad_image(_png_claiming(20000, 20000)), "too large", r"too large"),
    "12000x12000 header": (_bad_image(_png_claiming(12000, 12000)), "too large",
                           r"12000x12000 pixels, over the limit of 67108864"),
    "symlink to itself": (_self_loop, "unreadable", r"unreadable image"),
    "dangling symlink": (_dangling, "unreadable", r"unreadable image"),
    "no caption": (_bad_caption(None), "without caption", r"no caption file bad.txt"),
    "empty caption": (_bad_caption(b"  \n"), "with a bad caption", r"empty caption"),
    "non-utf8 caption": (_bad_caption("café, thé".encode("latin-1")), "with a bad caption",
                         r"caption file bad.txt is not UTF-8 text \(bad byte at offset 3\)"),
    "only commas": (_bad_caption(b", ,,  , ,"), "with a bad caption", r"no tags \(only commas"),
    "unparsable caption": (_bad_caption(b"cat, (dog:heavy)"), "with a bad caption",
                           r"does not parse: malformed weight 'heavy'"),
    "tag over 1000 characters": (_bad_caption(b"cat, " + b"x" * (MAX_TAG_CHARS + 1)), "with a bad caption",
                                 rf"tag of {MAX_TAG_CHARS + 1} characters .*over the limit of {MAX_TAG_CHARS}"),
    "10000 tags": (_bad_caption(", ".join(f"tag{i}" for i in range(10_000)).encode()), "with a bad caption",
                   rf"10000 tags, over the limit of {MAX_TAGS}"),
    "caption file over the size limit": (_bad_caption(b"a" * (MAX_CAPTION_BYTES + 1)), "with a bad caption",
                                         rf"{MAX_CAPTION_BYTES + 1} bytes, over the limit"),
}


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_image_is_skipped_with_one_warning_line_and_a_count(tmp_path, caplog, case):
    build, category, reason = BAD_CASES[case]
    _good(tmp_path)
    bad = build(tmp_path)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = scan_dataset(str(tmp_path))
    assert time.perf_counter() - start < 5
    assert [Path(item.path).name for item in items] == ["good.png"]
    lines = _skip_lines(caplog)
    assert len(lines) == 2, lines  # one line for the file, one count
    assert all("\n" not in line for line in lines)
    assert lines[0].startswith(f"skipping image {bad}: ")
    assert re.search(reason, lines[0]), lines[0]
    assert lines[1] == f"skipped 1 of 2 images in {tmp_path.resolve()}: 1 {category}"


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_image_in_error_mode_is_one_line_naming_file_and_reason(tmp_path, case):
    build, _, reason = BAD_CASES[case]
    _good(tmp_path)
    bad = build(tmp_path)
    with pytest.raises(CondvecError) as error:
        scan_dataset(str(tmp_path), on_bad_image="error")
    message = str(error.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"image {bad} in {tmp_path.resolve()}: ")
    assert re.search(reason, message), message
    assert "on_bad_image='skip'" in message


def test_count_at_the_end_sums_the_reasons(tmp_path, caplog):
    for i in range(17):
        _good(tmp_path, f"good{i:02d}.png")
    _bad_image(b"junk")(tmp_path)
    (tmp_path / "trunc.png").write_bytes(_PNG[:40])
    (tmp_path / "trunc.txt").write_text("cat", encoding="utf-8")
    (tmp_path / "nocap.png").write_bytes(_PNG)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = scan_dataset(str(tmp_path))
    assert len(items) == 17
    lines = _skip_lines(caplog)
    assert len(lines) == 4
    assert lines[-1] == f"skipped 3 of 20 images in {tmp_path.resolve()}: 2 unreadable, 1 without caption"


def test_a_clean_dataset_logs_nothing(tmp_path, caplog):
    _good(tmp_path, "a.png")
    _good(tmp_path, "b.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(scan_dataset(str(tmp_path))) == 2
    assert _skip_lines(caplog) == []


def test_only_bad_images_is_one_line_error_never_an_empty_dataset(tmp_path):
    _bad_image(b"junk")(tmp_path)
    (tmp_path / "empty.png").write_bytes(_PNG)
    (tmp_path / "empty.txt").write_text(",,,", encoding="utf-8")
    with pytest.raises(CondvecError) as error:
        scan_dataset(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no usable images in {tmp_path}: all 2 skipped "
                              "(1 unreadable, 1 with a bad caption; first bad.png: unreadable image")


def test_huge_header_is_refused_without_decoding(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data must not be read for an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", no_decoding)
    _bad_image(_png_claiming(12000, 12000))(tmp_path)
    with pytest.raises(CondvecError, match=r"bad.png .*: image is 12000x12000 pixels, over the limit"):
        scan_dataset(str(tmp_path), on_bad_image="error")
    (tmp_path / "bad.png").write_bytes(_png_claiming(20000, 20000))
    with pytest.raises(CondvecError, match=r"bad.png .*: image is too large"):
        scan_dataset(str(tmp_path), on_bad_image="error")


def test_max_pixels_is_the_limit(tmp_path):
    _good(tmp_path)  # 16x16 = 256 pixels
    assert len(scan_dataset(str(tmp_path), max_pixels=256)) == 1
    with pytest.raises(CondvecError, match=r"16x16 pixels, over the limit of 255"):
        scan_dataset(str(tmp_path), max_pixels=255, on_bad_image="error")


def test_symlink_loop_in_the_data_folder_is_visited_once(tmp_path, caplog):
    _good(tmp_path, "sub/a.png")
    _good(tmp_path, "b.png")
    os.symlink(tmp_path, tmp_path / "sub" / "back_to_root")  # sub/back_to_root/sub/back_to_root/...
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "itself")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = scan_dataset(str(tmp_path))
    assert sorted(Path(item.path).name for item in items) == ["a.png", "b.png"]
    assert _skip_lines(caplog) == []


def test_long_caption_within_the_limits_is_kept_and_fast(tmp_path):
    caption = ", ".join(f"tag{i}" for i in range(MAX_TAGS - 1)) + ", " + "y" * MAX_TAG_CHARS
    _good(tmp_path, "a.png", caption=caption)
    start = time.perf_counter()
    [item] = scan_dataset(str(tmp_path))
    assert time.perf_counter() - start < 5
    assert item.caption == caption


def test_captions_from_jsonl_are_checked_too(tmp_path, caplog):
    _good(tmp_path, "a.png")
    _good(tmp_path, "b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "cat"}\n'
                                             '{"file_name": "b.png", "text": " , , "}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = scan_dataset(str(tmp_path))
    assert [item.caption for item in items] == ["cat"]
    assert _skip_lines(caplog)[0] == "skipping image b.png: caption has no tags (only commas and spaces)"


# ---------------------------------------------------------------------------------------------------- valid images


def _write(root: Path, name: str, image: Image.Image, **save) -> Path:
    path = root / name
    image.save(path, **save)
    path.with_suffix(".txt").write_text("cat", encoding="utf-8")
    return path


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), index 1 red
    image.paste(1, (8, 0, 16, 16))
    image.info["transparency"] = 0
    return image


def _gray16() -> Image.Image:
    column = np.array([0, 128 * 257, 65535, 65535], dtype=np.uint16)
    return Image.fromarray(np.tile(column, (16, 4)))  # 16x16, mode I;16, columns cycle 0 / mid / max / max


# name: (builder, expected (R, G, B) uint8 of the pixel at row 0 for columns 0, 1, 2)
VALID = {
    "grayscale L": (lambda: Image.new("L", (16, 16), 100), [(100, 100, 100)] * 3),
    "1-bit": (lambda: Image.new("1", (16, 16), 1), [(255, 255, 255)] * 3),
    "RGBA transparent on white": (lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 0)), [(255, 255, 255)] * 3),
    "RGBA half transparent": (lambda: Image.new("RGBA", (16, 16), (0, 0, 255, 128)), [(127, 127, 255)] * 3),
    "LA opaque": (lambda: Image.new("LA", (16, 16), (50, 255)), [(50, 50, 50)] * 3),
    "LA transparent": (lambda: Image.new("LA", (16, 16), (50, 0)), [(255, 255, 255)] * 3),
    "palette with transparency": (_palette_with_transparency, [(255, 255, 255)] * 3),
    "16-bit grayscale I;16": (_gray16, [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
}


@pytest.mark.parametrize("case", VALID, ids=list(VALID))
def test_unusual_valid_png_loads_as_correct_rgb(tmp_path, caplog, case):
    build, expected = VALID[case]
    _write(tmp_path, "a.png", build())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        [item] = scan_dataset(str(tmp_path), on_bad_image="error")
    assert _skip_lines(caplog) == []
    assign_buckets([item], 16, step=8)
    pixels = load_image(item)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    as_uint8 = torch.round((pixels + 1.0) * 127.5).to(torch.uint8)  # (3, h, w)
    got = [tuple(as_uint8[:, 0, x].tolist()) for x in range(3)]
    assert all(max(abs(a - b) for a, b in zip(g, e)) <= 1 for g, e in zip(got, expected)), got


def test_palette_opaque_index_keeps_its_colour(tmp_path):
    _write(tmp_path, "a.png", _palette_with_transparency())
    [item] = scan_dataset(str(tmp_path))
    item.bucket = (16, 16)
    as_uint8 = torch.round((load_image(item) + 1.0) * 127.5).to(torch.uint8)
    assert tuple(as_uint8[:, 0, 12].tolist()) == (255, 0, 0)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    _write(tmp_path, "a.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)), quality=95)
    [item] = scan_dataset(str(tmp_path), on_bad_image="error")
    item.bucket = (16, 16)
    assert load_image(item).min() > 0.9  # no ink: white


def test_load_image_of_a_file_broken_after_the_scan_is_one_line_error(tmp_path):
    item = Item(path=str(_good(tmp_path)), caption="cat", repeats=1, width=16, height=16, bucket=(16, 16))
    Path(item.path).write_bytes(_PNG[: len(_PNG) // 2])
    with pytest.raises(CondvecError, match=r"cannot decode image .*good.png: .*; replace or remove the file") as error:
        load_image(item)
    assert "\n" not in str(error.value)


def test_condvec_train_on_only_bad_images_is_one_line_exit_2(tmp_path, capsys):
    from train.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _bad_image(b"junk")(data)
    (data / "nocap.png").write_bytes(_PNG)
    empty = tmp_path / "run.yaml"
    empty.write_text("{}\n", encoding="utf-8")
    code = main([str(empty), f"data.path={data}", "model.builtin=micro", "data.resolution=16", "training.steps=1",
                 f"output.dir={tmp_path / 'out'}", "output.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"condvec-train: error: no usable images in {data}: all 2 skipped"), err
    assert not any("Traceback" in line for line in err)
