"""grain pipelines (sigmavae_jax.data): decoding every image kind, skipping bad files,
transforms against a direct Pillow reference, determinism, checkpointed iterator state,
per-process shards, a tfds array_record source built without TensorFlow, and workers.

Images are written on the fly with Pillow into tmp folders; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from sigmavae_jax import data
from sigmavae_jax.config import ConfigError, load_config

S = 32  # train.image_size in these tests

# name -> (relative path, (width, height)) of the good images in `mixed_folder`.
GOOD = {
    "rgb_jpg": ("rgb_wide.jpg", (48, 36)),
    "rgb_png": ("rgb_tall.png", (40, 64)),
    "gray": ("gray.png", (50, 50)),
    "rgba": ("rgba.png", (36, 44)),
    "cmyk": ("cmyk.jpg", (40, 40)),
    "deep": ("deep16.png", (40, 34)),
    "webp": ("photo.webp", (52, 40)),
    "nested": ("nested/sub/deeper.JPG", (33, 45)),
    "bmp": ("nested/plain.bmp", (38, 30)),
    "palette": ("palette.png", (30, 42)),
}
BAD = ("bad/truncated.jpg", "bad/not_an_image.jpg", "bad/empty.png")


def _noise(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _sixteen_bit(width: int, height: int) -> np.ndarray:
    """A uint16 ramp over the full 0..65535 range (values > 255 everywhere but a corner)."""
    return np.linspace(0, 65535, width * height).round().astype(np.uint16).reshape(height, width)


def _write_good(root: pathlib.Path) -> dict[str, np.ndarray]:
    """Writes GOOD under root; returns the exact pixels of the lossless ones."""
    exact = {}
    for seed, (key, (rel, (w, h))) in enumerate(GOOD.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if key == "gray":
            array = _noise(w, h, 1, seed)
            Image.fromarray(array).save(path)  # (H, W) uint8: mode L
            exact[key] = np.repeat(array[..., None], 3, axis=-1)
        elif key == "rgba":
            array = _noise(w, h, 4, seed)
            Image.fromarray(array).save(path)  # (H, W, 4) uint8: mode RGBA
            exact[key] = array[..., :3]  # alpha dropped
        elif key == "cmyk":
            Image.fromarray(_noise(w, h, 4, seed), mode="CMYK").save(path, quality=95)
        elif key == "deep":
            array = _sixteen_bit(w, h)
            Image.fromarray(array).save(path)  # mode I;16 -> a 16-bit grayscale PNG
            gray = np.round(array / 257.0).astype(np.uint8)
            exact[key] = np.repeat(gray[..., None], 3, axis=-1)
        elif key == "palette":
            Image.fromarray(_noise(w, h, 3, seed)).convert("P").save(path)
            exact[key] = np.asarray(Image.open(path).convert("RGB"))
        elif key in ("rgb_png", "bmp"):
            array = _noise(w, h, 3, seed)
            Image.fromarray(array).save(path)
            exact[key] = array
        else:  # lossy: jpg, webp
            Image.fromarray(_noise(w, h, 3, seed)).save(path, quality=90)
    return exact


def _write_bad(root: pathlib.Path) -> None:
    (root / "bad").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 48, 3, 99)).save(buffer, format="JPEG")
    (root / BAD[0]).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / BAD[1]).write_text("this is not an image\n")
    (root / BAD[2]).write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("mixed")
    exact = _write_good(root)
    _write_bad(root)
    return root, exact


def _colour(index: int) -> tuple[int, int, int]:
    """Distinct, well-separated solid colours, so an output crop names its source image."""
    return (40 * (index % 6) + 20, 40 * ((index // 6) % 6) + 20, 40 * (index // 36) + 20)


def _identify(crops: np.ndarray) -> list[int]:
    """(N, S, S, 3) float crops of solid-colour images -> their image indices."""
    means = np.round((crops.reshape(len(crops), -1, 3).mean(axis=1) + 1.0) * 127.5)
    return [
        int(round((r - 20) / 40)) + 6 * int(round((g - 20) / 40)) + 36 * int(round((b - 20) / 40)) for r, g, b in means
    ]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> pathlib.Path:
    """11 solid-colour PNGs of assorted sizes (an odd count, so shards differ in size)."""
    root = tmp_path_factory.mktemp("colours")
    for i in range(11):
        size = (34 + 3 * i, 60 - 2 * i)
        Image.new("RGB", size, _colour(i)).save(root / f"img_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> pathlib.Path:
    """10 noise PNGs of assorted sizes and aspect ratios, for exact transform checks."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(10):
        size = (33 + 7 * i, 70 - 4 * i)
        Image.fromarray(_noise(*size, 3, seed=i)).save(root / f"p{i}.png")
    return root


def _cfg(path, *extra: str):
    return load_config(
        "tiny",
        ["data.source=folder", f"data.path={path}", "train.batch_size=4", f"train.image_size={S}", *extra],
    )


def _take(iterator, n: int) -> list[np.ndarray]:
    return [next(iterator) for _ in range(n)]


def _reference(path: pathlib.Path, size: int) -> np.ndarray:
    """Direct Pillow: resize shorter side (bicubic, long side truncated) + center crop."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------- decoding


def test_list_image_files_is_recursive_case_insensitive_and_sorted(mixed_folder):
    root, _ = mixed_folder
    files = data.list_image_files(root)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert sorted(rel) == sorted([path for path, _ in GOOD.values()] + list(BAD))
    assert rel == sorted(rel)
    assert "notes.txt" not in rel


@pytest.mark.parametrize("key", list(GOOD))
def test_every_good_image_decodes_to_rgb_uint8(mixed_folder, key):
    root, exact = mixed_folder
    rel, (w, h) = GOOD[key]
    for source in (root / rel, (root / rel).read_bytes()):
        image = data.decode_image(source)
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        if key in exact:
            np.testing.assert_array_equal(image, exact[key])


def test_sixteen_bit_is_scaled_not_clipped(mixed_folder):
    root, exact = mixed_folder
    assert Image.open(root / GOOD["deep"][0]).mode.startswith("I")  # really 16-bit on disk
    image = data.decode_image(root / GOOD["deep"][0])
    assert image.min() == 0 and image.max() == 255
    # A ramp over 0..65535 must stay a ramp over 0..255, not saturate after 1/257 of it.
    assert len(np.unique(image)) > 200
    np.testing.assert_array_equal(image, exact["deep"])


@pytest.mark.parametrize("rel", BAD)
def test_bad_files_decode_to_none(mixed_folder, rel):
    root, _ = mixed_folder
    assert data.decode_image(root / rel) is None
    assert data.decode_image((root / rel).read_bytes()) is None


def test_exif_orientation_is_applied_on_request(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_noise(40, 20, 3, seed=1)).save(tmp_path / "rotated.jpg", exif=exif)
    assert data.decode_image(tmp_path / "rotated.jpg").shape == (20, 40, 3)
    assert data.decode_image(tmp_path / "rotated.jpg", exif_transpose=True).shape == (40, 20, 3)


def test_training_over_a_folder_with_bad_files_skips_and_names_them(mixed_folder, caplog):
    root, _ = mixed_folder
    caplog.set_level(logging.WARNING, logger="sigmavae_jax.data")
    with data.train_iterator(_cfg(root), seed=0) as it:
        batches = _take(it, 7)  # 28 images: almost three passes over the 10 good ones
        report = it.skipped()
    for batch in batches:
        assert batch.shape == (4, S, S, 3) and batch.dtype == np.float32
        assert -1.0 <= batch.min() and batch.max() <= 1.0
    assert report["skipped"] == 3
    assert sorted(report["files"]) == sorted(str(root / rel) for rel in BAD)
    warnings = [r.getMessage() for r in caplog.records]
    for rel in BAD:  # each file once, with Pillow's reason
        (line,) = [w for w in warnings if str(root / rel) in w]
        pattern = rf"skipped unreadable image {re.escape(str(root / rel))}: \w+Error: .+ \(\d skipped so far\)"
        assert re.fullmatch(pattern, line), line
    assert any("image file is truncated" in w for w in warnings)


def test_an_image_over_pillows_pixel_limit_is_skipped_saying_so(tmp_path, monkeypatch, caplog):
    for i in range(4):
        Image.fromarray(_noise(40, 36, 3, seed=i)).save(tmp_path / f"small_{i}.png")
    Image.fromarray(_noise(64, 64, 3, seed=9)).save(tmp_path / "huge.png")
    # Pillow refuses images over twice MAX_IMAGE_PIXELS as decompression bombs: scaled down
    # here, so that 64 x 64 is over it and 40 x 36 under it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    caplog.set_level(logging.WARNING, logger="sigmavae_jax.data")
    with data.train_iterator(_cfg(tmp_path, "data.workers=0", "data.shuffle=false"), seed=0) as it:
        assert next(it).shape == (4, S, S, 3)
        assert it.skipped() == {"skipped": 1, "files": [str(tmp_path / "huge.png")]}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "huge.png: DecompressionBombError: Image size (4096 pixels) exceeds limit of 3000 pixels" in line


# --------------------------------------------------------------------------- transforms


def test_center_crop_equals_pillow_reference(photo_folder):
    files = data.list_image_files(photo_folder)
    cfg = _cfg(photo_folder, "data.crop=center", "data.shuffle=false", "train.batch_size=5")
    with data.train_iterator(cfg, seed=0) as it:
        got = np.concatenate(_take(it, 2))
    expected = np.stack([_reference(p, S) for p in files])
    np.testing.assert_array_equal(got, expected)
    with data.eval_batches(cfg, size=24, batch_size=4) as batches:
        got = np.concatenate([images[:n] for images, n in batches])
    np.testing.assert_array_equal(got, np.stack([_reference(p, 24) for p in files]))


def test_random_crops_vary_between_elements_and_repeat_for_the_seed(tmp_path):
    source = _noise(40, 80, 3, seed=7)  # resized to 32 x 64: 33 possible vertical offsets
    for i in range(8):
        Image.fromarray(source).save(tmp_path / f"copy{i}.png")
    resized = np.asarray(data.resize_shorter_side(Image.fromarray(source), S), np.float32) / 127.5 - 1
    cfg = _cfg(tmp_path, "train.batch_size=8")

    def crops(seed):
        with data.train_iterator(cfg, seed=seed) as it:
            return np.concatenate(_take(it, 2))

    first = crops(3)
    np.testing.assert_array_equal(first, crops(3))
    # Each crop is a window of the resized image, and the windows differ between elements.
    offsets = []
    for crop in first:
        matches = [t for t in range(64 - S + 1) if np.array_equal(resized[t : t + S], crop)]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 4


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different(photo_folder):
    def run(seed):
        with data.train_iterator(_cfg(photo_folder), seed=seed) as it:
            return _take(it, 5)

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_restored_state_continues_with_exactly_the_next_batches(mixed_folder):
    root, _ = mixed_folder
    cfg = _cfg(root)
    with data.train_iterator(cfg, seed=5) as it:
        _take(it, 3)  # 12 images of 10 good ones: inside the second epoch
        state = json.loads(json.dumps(it.get_state()))  # what Orbax's JsonSave stores
        expected = _take(it, 4)
        skipped = it.skipped()
    with data.train_iterator(cfg, seed=5) as resumed:
        resumed.set_state(state)
        got = _take(resumed, 4)
        assert resumed.skipped() == skipped
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x, y)
    with data.train_iterator(cfg, seed=6) as other, pytest.raises(ValueError, match="seed: saved 5, now 6"):
        other.set_state(state)


# --------------------------------------------------------------------------- shards


def test_two_processes_read_disjoint_covering_shards(colour_folder):
    cfg = _cfg(colour_folder, "data.crop=center")
    seen = []
    for process in range(2):
        with data.train_iterator(cfg, seed=0, process_index=process, process_count=2) as it:
            shard_size = len(range(process, 11, 2))  # 6 and 5
            batches = _take(it, math.ceil(shard_size / 2))
            assert all(b.shape == (2, S, S, 3) for b in batches)  # global 4 / 2 processes
            first_epoch = _identify(np.concatenate(batches)[:shard_size])
            assert len(set(first_epoch)) == shard_size
            seen.append(set(first_epoch))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(11))


def test_batch_size_not_divisible_by_processes_is_a_clear_error(colour_folder):
    with pytest.raises(ValueError, match=r"train\.batch_size=5 is not divisible by the 2 processes"):
        data.train_iterator(_cfg(colour_folder, "train.batch_size=5"), seed=0, process_count=2)


def test_eval_counts_every_image_once_over_processes(colour_folder):
    cfg = _cfg(colour_folder)
    seen, batch_counts = [], []
    for process in range(2):
        with data.eval_batches(cfg, size=16, batch_size=4, process_index=process, process_count=2) as it:
            batches = list(it)
        batch_counts.append(len(batches))
        for images, n in batches:
            assert images.shape == (4, 16, 16, 3) and images.dtype == np.float32
            assert not images[n:].any()  # padding rows are zeros
            seen += _identify(images[:n])
    assert batch_counts == [2, 2]  # the same on every process: 6 and 5 images, 4 a batch
    assert sorted(seen) == list(range(11))
    with data.eval_batches(cfg, size=16, batch_size=4, limit=6) as it:
        assert [n for _, n in it] == [4, 2]


# --------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
    """A prepared array_record dataset `sigmavae_test_colours`: train = 9 colour PNGs + one
    corrupt record, validation = 5 colour PNGs; built without TensorFlow."""
    import tensorflow_datasets as tfds

    def png(index: int, size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, _colour(index)).save(buffer, format="PNG")
        return buffer.getvalue()

    class SigmavaeTestColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),  # stored as encoded PNG
                "file_name": tfds.features.Text(),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(range(9), with_corrupt=True),
                "validation": self._generate_examples(range(9, 14), with_corrupt=False),
            }

        def _generate_examples(self, indices, with_corrupt):
            for i in indices:
                yield i, {"image": png(i, (30 + i, 44 - i)), "file_name": f"colour_{i}.png"}
            if with_corrupt:
                yield 99, {"image": png(0, (30, 30))[:40], "file_name": "corrupt.png"}

    root = tmp_path_factory.mktemp("tfds")
    SigmavaeTestColours(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def _tfds_cfg(root, *extra):
    return load_config(
        "tiny",
        [
            "data.source=tfds",
            "data.name=sigmavae_test_colours",
            f"data.dir={root}",
            "train.batch_size=4",
            f"train.image_size={S}",
            *extra,
        ],
    )


def test_tfds_source_trains_and_skips_a_corrupt_record(tfds_dir):
    with data.train_iterator(_tfds_cfg(tfds_dir, "data.crop=center"), seed=0) as it:
        batches = _take(it, 3)  # 12 images: every one of the 9 good ones, corrupt skipped
        assert it.skipped() == {"skipped": 1, "files": ["corrupt.png"]}
    assert all(b.shape == (4, S, S, 3) and b.dtype == np.float32 for b in batches)
    assert set(_identify(np.concatenate(batches))) == set(range(9))


def test_tfds_eval_split_counts_each_image_once_with_a_partial_batch(tfds_dir):
    with data.eval_batches(_tfds_cfg(tfds_dir), size=16, batch_size=2) as it:
        batches = list(it)
    assert [n for _, n in batches] == [2, 2, 1]
    assert sorted(sum((_identify(images[:n]) for images, n in batches), [])) == list(range(9, 14))


def test_unknown_tfds_dataset_and_feature_are_clear_errors(tfds_dir):
    with pytest.raises(ValueError, match="data.name='no_such_dataset' not found"):
        data.train_iterator(_tfds_cfg(tfds_dir, "data.name=no_such_dataset"), seed=0)
    with pytest.raises(ValueError, match=r"data.image_key='img'.*\['file_name', 'image'\]"):
        data.train_iterator(_tfds_cfg(tfds_dir, "data.image_key=img"), seed=0)


# --------------------------------------------------------------------------- workers


def test_one_worker_process_gives_the_same_batches_and_state(mixed_folder):
    root, _ = mixed_folder
    with data.train_iterator(_cfg(root), seed=4) as it:
        expected = _take(it, 4)
    with data.train_iterator(_cfg(root, "data.workers=1"), seed=4) as it:
        got = _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 2)
        assert it.skipped()["skipped"] == 3  # names travel back from the worker
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x, y)
    with data.train_iterator(_cfg(root, "data.workers=1"), seed=4) as resumed:
        resumed.set_state(state)
        for x, y in zip(expected[2:], _take(resumed, 2)):
            np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- errors


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        data.train_iterator(_cfg(missing), seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    searched = r"\.jpg, \.jpeg, \.png, \.webp, \.bmp"
    with pytest.raises(FileNotFoundError, match=rf"no images under .*empty.*{searched}"):
        data.eval_batches(_cfg(tmp_path / "empty"), batch_size=2)


def test_a_folder_of_only_unreadable_files_fails_instead_of_spinning(mixed_folder, tmp_path):
    root, _ = mixed_folder
    for rel in BAD:
        (tmp_path / pathlib.Path(rel).name).write_bytes((root / rel).read_bytes())
    with data.train_iterator(_cfg(tmp_path), seed=0) as it:
        with pytest.raises(ConfigError, match="none of them decodes"):
            next(it)


def test_config_without_data_section_is_a_clear_error():
    with pytest.raises(ValueError, match="no data section"):
        data.train_iterator(load_config("tiny"), seed=0)
