import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conditioner.errors import CondvecError
from demo.data import (
    BACKGROUNDS,
    COLOURS,
    generate_concept_dataset,
    generate_demo_dataset,
    object_tags,
    render,
    tag_vocabulary,
)
from demo.detector import accuracy, degrade, detect

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _caption_tags(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").split(",")]


def test_same_seed_gives_identical_bytes(tmp_path):
    generate_demo_dataset(tmp_path / "a", 20, size=32, seed=7)
    generate_demo_dataset(tmp_path / "b", 20, size=32, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 41  # 20 png + 20 txt + ground_truth.jsonl
    assert a == b


def test_different_seed_gives_different_files(tmp_path):
    generate_demo_dataset(tmp_path / "a", 20, size=32, seed=7)
    generate_demo_dataset(tmp_path / "b", 20, size=32, seed=8)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["ground_truth.jsonl"] != b["ground_truth.jsonl"]
    assert sum(a[name] != b[name] for name in a if name.endswith(".png")) > 10


@pytest.mark.parametrize("size", [32, 64])
def test_layout_and_captions_match_ground_truth(tmp_path, size):
    records = generate_demo_dataset(tmp_path, 60, size=size, seed=3)
    vocabulary = set(tag_vocabulary())
    written = [json.loads(line) for line in (tmp_path / "ground_truth.jsonl").read_text().splitlines()]
    assert written == records
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(r["file_name"] for r in records)
    assert sorted(p.stem for p in tmp_path.glob("*.txt")) == [Path(n).stem for n in pngs]

    for record in records:
        image = Image.open(tmp_path / record["file_name"])
        assert image.mode == "RGB" and image.size == (size, size)
        tags = _caption_tags((tmp_path / record["file_name"]).with_suffix(".txt"))
        assert tags == record["tags"]
        assert set(tags) <= vocabulary
        objects = record["objects"]
        expected = {t for obj in objects for t in object_tags(obj)} | {f"{record['background']} background"}
        if len(objects) == 2:
            expected.add("two objects")
            assert [o["position"] for o in objects] == ["left", "right"]
            assert objects[0]["box"][2] < objects[1]["box"][0]  # left box ends before the right one starts
            if objects[0]["shape"] == objects[1]["shape"]:
                assert objects[0]["colour"] != objects[1]["colour"]
        assert set(tags) == expected and len(tags) == len(expected)  # each tag once


def test_written_png_equals_render_of_its_record(tmp_path):
    records = generate_demo_dataset(tmp_path, 10, size=64, seed=2)
    for record in records:
        on_disk = np.asarray(Image.open(tmp_path / record["file_name"]))
        assert np.array_equal(on_disk, np.asarray(render(record, 64)))


def test_two_object_prob_extremes(tmp_path):
    assert all(len(r["objects"]) == 1 for r in generate_demo_dataset(tmp_path / "one", 30, two_object_prob=0.0))
    assert all(len(r["objects"]) == 2 for r in generate_demo_dataset(tmp_path / "two", 30, two_object_prob=1.0))


def test_exclude_keeps_a_combination_out(tmp_path):
    held_out = "yellow triangle"
    baseline = generate_demo_dataset(tmp_path / "all", 200, seed=0)
    assert any(held_out in r["tags"] for r in baseline)  # the exclusion below has something to remove
    records = generate_demo_dataset(tmp_path / "held", 200, seed=0, exclude=lambda r: held_out in r["tags"])
    assert len(records) == 200
    assert not any(o["colour"] == "yellow" and o["shape"] == "triangle" for r in records for o in r["objects"])
    assert not any(held_out in _caption_tags(p) for p in (tmp_path / "held").glob("*.txt"))
    with pytest.raises(CondvecError, match="exclude"):
        generate_demo_dataset(tmp_path / "none", 3, exclude=lambda r: True)


def test_concept_dataset_captions(tmp_path):
    attributes = {"shape": "triangle", "colour": "yellow", "size": "large"}
    records = generate_concept_dataset(tmp_path, "mascot", attributes, 12, seed=1)
    for record in records:
        tags = _caption_tags((tmp_path / record["file_name"]).with_suffix(".txt"))
        assert sorted(tags) == sorted(["mascot", f"{record['background']} background"])
        assert record["concept"] == "mascot"
        (obj,) = record["objects"]
        assert {k: obj[k] for k in attributes} == attributes
        found = detect(Image.open(tmp_path / record["file_name"]))
        assert [{k: o[k] for k in attributes} for o in found["objects"]] == [attributes]
    fixed = generate_concept_dataset(
        tmp_path / "fixed", "mascot", attributes | {"position": "right", "background": "gray"}, 5, seed=1
    )
    assert all(r["objects"][0]["position"] == "right" and r["background"] == "gray" for r in fixed)
    with pytest.raises(CondvecError):
        generate_concept_dataset(tmp_path / "bad", "a, b", attributes, 1)
    with pytest.raises(CondvecError):
        generate_concept_dataset(tmp_path / "bad", "mascot", attributes | {"colour": "purple"}, 1)


@pytest.mark.parametrize(
    "args",
    [
        ["--num", "5", "--size", "48"],
        ["--num", "0"],
        ["--num", "five"],
        [],
        ["--num", "5", "--two-object-prob", "1.5"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args):
    proc = subprocess.run(
        [sys.executable, "-m", "demo.data", str(tmp_path / "out"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m demo.data: error: ")
    assert "Traceback" not in proc.stderr


def test_cli_writes_dataset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "demo.data", str(tmp_path), "--num", "4", "--size", "64", "--seed", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert len((tmp_path / "ground_truth.jsonl").read_text().splitlines()) == 4


def test_render_from_attribute_spec():
    spec = {
        "background": "white",
        "objects": [
            {"shape": "circle", "colour": "red", "size": "large", "position": "left"},
            {"shape": "square", "colour": "blue", "size": "small", "position": "right"},
        ],
    }
    for size in (32, 64):
        assert detect(render(spec, size)) == {"background": "white", "objects": spec["objects"]}


def test_detector_accuracy_at_least_98_percent(tmp_path):
    records = generate_demo_dataset(tmp_path, 300, size=32, seed=11)
    images = [Image.open(tmp_path / r["file_name"]) for r in records]
    result = accuracy(records, images)
    assert result["images"] == 300
    for key in ("count", "background", "shape", "colour", "size", "position"):
        assert result[key] >= 0.98, (key, result[key])


def test_detector_reads_shape_and_size_through_ragged_edges(tmp_path):
    records = generate_demo_dataset(tmp_path, 200, size=32, seed=12)
    rng = np.random.default_rng(0)
    clean = [np.asarray(Image.open(tmp_path / r["file_name"]).convert("RGB")) for r in records]
    images = [degrade(im, rng) for im in clean]
    changed = np.mean([np.mean(np.any(a != b, axis=2)) for a, b in zip(clean, images)])
    assert changed > 0.5, "the degradation must actually change the images"
    result = accuracy(records, images)
    for key in ("shape", "size", "colour", "position"):
        assert result[key] >= 0.95, (key, result[key])


def test_palette_is_well_separated():
    # Detection relies on every object colour being far from every background and from every other colour.
    colours = np.array(list(COLOURS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=2).min() > 200
    pair = np.linalg.norm(colours[:, None] - colours[None], axis=2)
    assert pair[~np.eye(len(colours), dtype=bool)].min() > 200
