"""Dataset scanning, buckets, image loading, epoch batches and the latent / pixel caches."""

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conditioner.errors import CondvecError
from demo.data import generate_demo_dataset
from train.cache import LatentCache, PixelCache, vae_identity
from train.data import Item, assign_buckets, epoch_batches, load_image, scan_dataset


def _image(path: Path, size: tuple[int, int] = (16, 16), colour=(200, 30, 60), mode: str = "RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def _pair(root: Path, rel: str, caption: str | None = "cat, dog", size: tuple[int, int] = (16, 16)) -> Path:
    """An image and (unless caption is None) its .txt sidecar."""
    path = _image(root / rel, size)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _rels(items: list[Item], root: Path) -> list[str]:
    return [Path(item.path).relative_to(root.resolve()).as_posix() for item in items]


# ---------------------------------------------------------------------------------------------------- scanning


def test_sidecars_are_found_recursively_in_path_order(tmp_path):
    _pair(tmp_path, "b.png", "  red circle, blue square \n", size=(20, 10))
    _pair(tmp_path, "a/z/c.JPG")
    _pair(tmp_path, "a/d.webp")
    _pair(tmp_path, ".cache/hidden.png")  # hidden folders are skipped
    (tmp_path / "notes.txt").write_text("not a caption", encoding="utf-8")
    items = scan_dataset(str(tmp_path))
    assert _rels(items, tmp_path) == ["a/d.webp", "a/z/c.JPG", "b.png"]
    assert all(os.path.isabs(item.path) for item in items)
    wide = items[2]
    assert (wide.caption, wide.width, wide.height, wide.repeats, wide.bucket) == (
        "red circle, blue square", 20, 10, 1, (0, 0))


def test_empty_caption_is_skipped_not_trained_as_unconditional(tmp_path):
    _pair(tmp_path, "a.png", "")
    _pair(tmp_path, "b.png", "cat")
    assert [item.caption for item in scan_dataset(str(tmp_path))] == ["cat"]


def test_caption_ext_selects_the_sidecar_files(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("fox", encoding="utf-8")
    assert scan_dataset(str(tmp_path), caption_ext=".caption")[0].caption == "fox"


def test_demo_dataset_scans_with_its_captions(tmp_path):
    records = generate_demo_dataset(tmp_path, 4)
    items = scan_dataset(str(tmp_path))
    assert [item.caption for item in items] == [r["caption"] for r in records]
    assert all((item.width, item.height) == (32, 32) for item in items)


def test_exif_rotation_swaps_width_and_height(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees
    _image(tmp_path / "photo.jpg", size=(40, 20), exif=exif)
    (tmp_path / "photo.txt").write_text("cat", encoding="utf-8")
    [item] = scan_dataset(str(tmp_path))
    assert (item.width, item.height) == (20, 40)
    assign_buckets([item], 32, step=8)
    assert load_image(item).shape == (3, item.bucket[1], item.bucket[0])


def _write_jsonl(root: Path, lines: list[str]) -> Path:
    path = root / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_captions_replace_sidecars(tmp_path):
    _pair(tmp_path, "a.png", "from sidecar")
    _image(tmp_path / "sub/b.png")
    _write_jsonl(tmp_path, [json.dumps({"file_name": "sub/b.png", "text": "fox"}), "",
                            json.dumps({"file_name": "./a.png", "text": "cat, dog", "extra": 1})])
    for mode in ("auto", "jsonl"):
        items = scan_dataset(str(tmp_path), metadata=mode)
        assert [(rel, item.caption) for rel, item in zip(_rels(items, tmp_path), items)] == [
            ("a.png", "cat, dog"), ("sub/b.png", "fox")]
    with pytest.raises(CondvecError, match="sub/b.png"):  # sidecar mode ignores the jsonl: b.png has no caption
        scan_dataset(str(tmp_path), metadata="sidecar", on_bad_image="error")


GOOD = json.dumps({"file_name": "a.png", "text": "cat"})
JSONL_ERRORS = {
    "not json": (["{oops"], r"line 1: not valid JSON"),
    "not an object": ([GOOD, '["a.png", "cat"]'], r"line 2: expected a JSON object"),
    "missing text": ([json.dumps({"file_name": "a.png"})], r"line 1: missing key 'text'"),
    "missing file_name": ([json.dumps({"text": "cat"})], r"line 1: missing key 'file_name'"),
    "text not a string": ([json.dumps({"file_name": "a.png", "text": ["cat"]})], r"line 1: 'text' must be a string"),
    "no such file": ([GOOD, json.dumps({"file_name": "gone.png", "text": "x"})], r"line 2: .*'gone.png' does not exi"),
    "duplicate": ([GOOD, GOOD], r"line 2: .*'a.png' is already listed on line 1"),
    "not an image": ([GOOD, json.dumps({"file_name": "readme.md", "text": "x"})], r"line 2: .*not an image"),
}


@pytest.mark.parametrize("case", JSONL_ERRORS, ids=list(JSONL_ERRORS))
def test_malformed_jsonl_names_file_and_line(tmp_path, case):
    lines, message = JSONL_ERRORS[case]
    _image(tmp_path / "a.png")
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    jsonl = _write_jsonl(tmp_path, lines)
    with pytest.raises(CondvecError, match=message) as error:
        scan_dataset(str(tmp_path), metadata="jsonl")
    assert str(jsonl.resolve()) in str(error.value)
    assert "\n" not in str(error.value)


def test_jsonl_mode_requires_the_file(tmp_path):
    _pair(tmp_path, "a.png")
    with pytest.raises(FileNotFoundError, match=r"metadata.jsonl not found.*metadata='sidecar'"):
        scan_dataset(str(tmp_path), metadata="jsonl")


def test_image_missing_from_jsonl_is_reported(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    _write_jsonl(tmp_path, [GOOD])
    with pytest.raises(CondvecError, match=r"image b.png in .*: not listed in metadata.jsonl; add a line"):
        scan_dataset(str(tmp_path), on_bad_image="error")
    assert [Path(item.path).name for item in scan_dataset(str(tmp_path))] == ["a.png"]


def test_kohya_folders_give_repeats_innermost_wins(tmp_path):
    _pair(tmp_path, "10_mascot/a.png")
    _pair(tmp_path, "3_outer/5_inner/b.png")
    _pair(tmp_path, "plain/c.png")
    _pair(tmp_path, "d.png")
    items = scan_dataset(str(tmp_path), default_repeats=2)
    assert dict(zip(_rels(items, tmp_path), (i.repeats for i in items))) == {
        "10_mascot/a.png": 10, "3_outer/5_inner/b.png": 5, "plain/c.png": 2, "d.png": 2}


def test_explicit_repeats_override_folders_below_them(tmp_path):
    _pair(tmp_path, "10_mascot/a.png")
    _pair(tmp_path, "3_outer/5_inner/b.png")
    _pair(tmp_path, "3_outer/c.png")
    _pair(tmp_path, "plain/deep/d.png")
    repeats = {"10_mascot": 4, "3_outer/": 6, "plain": 7, "plain/deep": 8}
    items = scan_dataset(str(tmp_path), repeats=repeats)
    assert dict(zip(_rels(items, tmp_path), (i.repeats for i in items))) == {
        "10_mascot/a.png": 4, "3_outer/5_inner/b.png": 6, "3_outer/c.png": 6, "plain/deep/d.png": 8}


def test_repeats_key_matching_no_folder_lists_the_folders(tmp_path):
    _pair(tmp_path, "10_mascot/a.png")
    _pair(tmp_path, "sub/b.png")
    with pytest.raises(CondvecError, match=r"repeats key 'mascot' matches no folder.*folders: 10_mascot, sub$"):
        scan_dataset(str(tmp_path), repeats={"mascot": 3})
    with pytest.raises(CondvecError, match=r"repeats\['sub'\] must be an integer >= 1, got 0"):
        scan_dataset(str(tmp_path), repeats={"sub": 0})


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist"):
        scan_dataset(str(tmp_path / "nowhere"))


def test_no_images_names_the_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("cat", encoding="utf-8")
    with pytest.raises(CondvecError, match=r"no images found .*\.png, \.jpg, \.jpeg, \.webp, \.bmp"):
        scan_dataset(str(tmp_path))


def test_missing_captions_all_missing_is_one_error_with_the_hint(tmp_path):
    for name in "abcde":
        _pair(tmp_path, f"{name}.png", caption=None)
    with pytest.raises(CondvecError) as error:
        scan_dataset(str(tmp_path))
    message = str(error.value)
    assert "no usable images" in message
    assert "all 5 skipped (5 without caption; first a.png: no caption file a.txt)" in message
    assert "caption_ext" in message and "metadata.jsonl" in message and "\n" not in message


def test_missing_caption_in_error_mode_names_the_first_image(tmp_path):
    for name in "abc":
        _pair(tmp_path, f"{name}.png", caption=None if name != "a" else "cat")
    with pytest.raises(CondvecError, match=r"^image b.png in .*: no caption file b.txt; write a NAME.txt file"):
        scan_dataset(str(tmp_path), on_bad_image="error")


def test_caption_that_is_not_utf8_is_an_error_in_error_mode(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(CondvecError, match=r"image a.png in .*: caption file a.txt is not UTF-8"):
        scan_dataset(str(tmp_path), on_bad_image="error")


def test_corrupt_image_is_named_in_error_mode(tmp_path):
    _pair(tmp_path, "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "bad.txt").write_text("cat", encoding="utf-8")
    with pytest.raises(CondvecError, match=r"image bad.png in .*: unreadable image"):
        scan_dataset(str(tmp_path), on_bad_image="error")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"metadata": "csv"}, "metadata must be 'auto', 'jsonl' or 'sidecar'"),
    ({"caption_ext": "txt"}, "caption_ext must be a file extension starting with '.'"),
    ({"caption_ext": ".png"}, "is an image extension"),
    ({"default_repeats": 0}, "default_repeats must be an integer >= 1"),
    ({"on_bad_image": "ignore"}, "on_bad_image must be 'skip' or 'error'"),
    ({"max_pixels": 0}, "max_pixels must be an integer >= 1"),
])
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    _pair(tmp_path, "a.png")
    with pytest.raises(CondvecError, match=message):
        scan_dataset(str(tmp_path), **kwargs)


# ---------------------------------------------------------------------------------------------------- buckets


def _item(width: int, height: int, repeats: int = 1, path: str = "x.png") -> Item:
    return Item(path=path, caption="", repeats=repeats, width=width, height=height)


def test_square_images_get_the_square_bucket():
    items = [_item(100, 100), _item(7, 7)]
    assert assign_buckets(items, 512) == [(512, 512)]
    assert all(item.bucket == (512, 512) for item in items)


def test_wide_and_tall_images_get_the_nearest_aspect_bucket():
    wide, tall = _item(200, 100), _item(100, 200)
    used = assign_buckets([wide, tall], 512, step=64)
    assert wide.bucket == (640, 384) and tall.bucket == (384, 640)  # the most extreme buckets at max_aspect 2
    assert used == [(384, 640), (640, 384)]
    near_square, slightly_wide = _item(110, 100), _item(125, 100)
    assign_buckets([near_square, slightly_wide], 512, step=64)
    assert near_square.bucket == (512, 512)  # aspect 1.1: log-ratio nearer 1.0 than 576x448's 1.29
    assert slightly_wide.bucket == (576, 448)  # aspect 1.25: nearer 1.29 than 1.0


@pytest.mark.parametrize(("resolution", "step", "max_aspect"), [(512, 64, 2.0), (32, 8, 2.0), (1024, 64, 4.0)])
def test_buckets_are_step_multiples_within_area_and_aspect(resolution, step, max_aspect):
    items = [_item(w, h) for w in range(1, 400, 37) for h in range(1, 400, 41)]
    used = assign_buckets(items, resolution, step=step, max_aspect=max_aspect)
    assert (resolution, resolution) in used and len(used) > 1
    for w, h in used:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2
        assert 1 / max_aspect <= w / h <= max_aspect


def test_disabled_bucketing_gives_every_image_the_square():
    items = [_item(300, 100), _item(100, 300)]
    assert assign_buckets(items, 256, enabled=False) == [(256, 256)]
    assert [item.bucket for item in items] == [(256, 256)] * 2


def test_resolution_must_be_a_multiple_of_step():
    with pytest.raises(CondvecError, match="resolution must be a positive multiple of the bucket step 64, got 500"):
        assign_buckets([_item(10, 10)], 500)


# ---------------------------------------------------------------------------------------------------- load_image


def test_load_image_shape_range_and_crop(tmp_path):
    # 64x32: left half black, right half white; the centre crop to 32x32 keeps both halves.
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 32))
    image.save(tmp_path / "a.png")
    item = _item(64, 32, path=str(tmp_path / "a.png"))
    item.bucket = (32, 32)
    pixels = load_image(item)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert torch.all(pixels[:, :, :15] == -1.0) and torch.all(pixels[:, :, 17:] == 1.0)
    item.bucket = (24, 40)  # tall bucket: the image is scaled to 80x40 and cropped to its middle 24 columns
    assert load_image(item).shape == (3, 40, 24)


def test_load_image_flip_is_an_exact_mirror(tmp_path):
    generate_demo_dataset(tmp_path, 1)
    [item] = scan_dataset(str(tmp_path))
    item.bucket = (24, 40)
    plain = load_image(item)
    assert not torch.equal(plain, torch.flip(plain, dims=(2,)))
    assert torch.equal(load_image(item, flip=True), torch.flip(plain, dims=(2,)))


def test_transparent_pixels_become_white(tmp_path):
    _image(tmp_path / "a.png", mode="RGBA", colour=(255, 0, 0, 0))
    item = _item(16, 16, path=str(tmp_path / "a.png"))
    item.bucket = (16, 16)
    assert torch.all(load_image(item) == 1.0)


def test_load_image_requires_a_bucket(tmp_path):
    with pytest.raises(CondvecError, match="call assign_buckets"):
        load_image(_item(16, 16, path=str(_image(tmp_path / "a.png"))))


# ---------------------------------------------------------------------------------------------------- epoch_batches


def _bucketed_items() -> list[Item]:
    items = [_item(100, 100, repeats=1 + i % 3) for i in range(7)] + [_item(200, 100, repeats=2) for _ in range(3)]
    items.append(_item(100, 200))  # a bucket with a single image, smaller than a batch
    assign_buckets(items, 64, step=8)
    return items


def test_epoch_batches_are_deterministic_whatever_the_global_rng():
    items = _bucketed_items()
    torch.manual_seed(1)
    first = epoch_batches(items, 4, seed=3, epoch=2)
    torch.manual_seed(2)
    torch.rand(10)
    assert epoch_batches(items, 4, seed=3, epoch=2) == first
    assert epoch_batches(items, 4, seed=4, epoch=2) != first


def test_epoch_batches_full_single_bucket_batches_covering_every_repeat():
    items = _bucketed_items()
    batches = epoch_batches(items, 4, seed=0, epoch=0)
    assert all(len(batch) == 4 for batch in batches)
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in batches)
    counts = Counter(i for batch in batches for i in batch)
    assert all(counts[i] >= item.repeats for i, item in enumerate(items))
    per_bucket = Counter(item.bucket for item in items for _ in range(item.repeats))
    assert len(batches) == sum(math.ceil(n / 4) for n in per_bucket.values())
    lonely = len(items) - 1
    assert [lonely] * 4 in batches  # a one-image bucket fills its batch with that image


def test_epoch_batches_differ_between_epochs():
    items = _bucketed_items()
    assert epoch_batches(items, 4, seed=0, epoch=0) != epoch_batches(items, 4, seed=0, epoch=1)


# ---------------------------------------------------------------------------------------------------- caches


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()


@pytest.fixture
def dataset(tmp_path):
    generate_demo_dataset(tmp_path / "data", 3)
    items = scan_dataset(str(tmp_path / "data"))
    items[2].width = 64  # a second bucket: 40x24
    assign_buckets(items, 32, step=8)
    return items


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.safetensors"))


def test_latent_cache_writes_one_entry_per_image_and_flip(tmp_path, dataset):
    vae, cache_dir = _vae(), tmp_path / "cache"
    cache = LatentCache(vae, str(cache_dir))
    assert cache.prepare(dataset, flips=True, progress=False) == 6
    entries = _entries(cache_dir)
    assert len(entries) == 6
    assert {p.parent.relative_to(cache_dir).as_posix() for p in entries} == {
        f"{vae_identity(vae)}/32x32", f"{vae_identity(vae)}/40x24"}
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]
    assert cache.prepare(dataset, flips=True, progress=False) == 0
    item = dataset[2]
    with torch.no_grad():
        expected = vae.encode(load_image(item, flip=True)[None]).latent_dist.mean[0] * vae.config.scaling_factor
    latent = cache.get(item, flip=True)
    assert latent.shape == (4, 12, 20)
    assert torch.allclose(latent, expected, atol=1e-6)


def test_latent_cache_second_instance_reads_from_disk(tmp_path, dataset):
    vae = _vae()
    first = LatentCache(vae, str(tmp_path / "cache")).get(dataset[0], flip=False)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE must not be called for a cached image")

    vae.encode = no_encoding
    second = LatentCache(vae, str(tmp_path / "cache"))
    assert torch.equal(second.get(dataset[0]), first)
    assert second.prepare(dataset[:1], flips=False, progress=False) == 0


def test_latent_cache_reencodes_a_modified_image(tmp_path, dataset):
    cache = LatentCache(_vae(), str(tmp_path / "cache"))
    item = dataset[0]
    before = cache.get(item)
    stat = os.stat(item.path)
    Image.new("RGB", (32, 32), (0, 255, 0)).save(item.path)
    os.utime(item.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.prepare([item], flips=False, progress=False) == 1
    after = cache.get(item)
    assert not torch.allclose(after, before)
    assert len(_entries(tmp_path / "cache")) == 2  # the stale entry stays, unread


def test_vae_identity_follows_the_encoder_weights(tmp_path, dataset):
    vae = _vae(0)
    identity = vae_identity(vae)
    assert identity == vae_identity(_vae(0))
    assert identity != vae_identity(_vae(1))
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)  # a decoder-only fine-tune encodes identically
    assert vae_identity(vae) == identity
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert vae_identity(vae) != identity
    LatentCache(_vae(0), str(tmp_path / "cache")).get(dataset[0])
    LatentCache(_vae(1), str(tmp_path / "cache")).get(dataset[0])
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {vae_identity(_vae(0)), vae_identity(_vae(1))}


def test_pixel_cache_matches_load_image(dataset):
    cache = PixelCache()
    assert cache.prepare(dataset, flips=True, progress=False) == 3
    assert cache.prepare(dataset, flips=True, progress=False) == 0
    for item in dataset:
        for flip in (False, True):
            assert torch.equal(cache.get(item, flip), load_image(item, flip))
