"""Input pipelines: grain over a tfds data source or a folder of images.

Public API
----------
`train_iterator(cfg, *, seed, process_index=0, process_count=1) -> TrainIterator`
    Endless, shuffled (if `data.shuffle`), per-process training batches.
    `next(it)` -> float32 (B_local, S, S, 3) in [-1, 1], B_local = train.batch_size //
    process_count, S = train.image_size. `it.get_state() -> dict` (JSON-able) and
    `it.set_state(state)` resume exactly at the next batch; `it.skipped()` ->
    {"skipped": n, "files": [...]} names the unreadable images met so far; `it.close()`
    (or `with train_iterator(...) as it:`) stops reader threads and worker processes.
`eval_batches(cfg, *, size=256, batch_size, process_index=0, process_count=1, limit=None)
 -> EvalIterator`
    Finite, ordered, unshuffled batches of this process's shard of `data.eval_split` (or
    the folder): (images float32 (batch_size, size, size, 3), n_real). Rows [:n_real] are
    images, the rest zero padding, so every image counts exactly once. Every process yields
    the same number of batches (multi-host collectives stay in step); `limit` keeps the first
    `limit` images of the whole split. Also `.skipped()` and `.close()`.
`decode_image(data) -> uint8 (H, W, 3) | None`: bytes or a path -> RGB, None if unreadable.
`list_image_files(path) -> list[Path]`: the images under a folder, recursively, sorted.
`resize_shorter_side`, `center_crop`, `to_unit_range`: the transform pieces.

Transforms: train = resize the shorter side to S (Pillow bicubic), random crop (or center
crop with `data.crop=center`) to S x S, x / 127.5 - 1. Eval = the same with a center crop.
Sizes follow torchvision's conventions (long side int(S * long / short), center offsets
round((H - S) / 2)), so the eval transform is the reference protocol's.

Unreadable images (corrupt, truncated, not an image, over Pillow's decompression-bomb limit of
`PIL.Image.MAX_IMAGE_PIXELS` x 2 pixels) are skipped, never a crash: decoding yields a
`Skipped(name, reason)` marker instead of an array and batching passes over it, reporting
the name and the reason with the batch (the log's warning names both), so the count is exact
even when decoding runs in worker processes, and the iterator state stays the state of the
element stream (deterministic, checkpointable).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image, ImageOps

from sigmavae_jax import storage
from sigmavae_jax.config import Config, ConfigError, DataConfig
from sigmavae_jax.messages import one_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STATE_FORMAT = "sigmavae_jax.data/1"

# 16-bit grayscale modes Pillow opens PNGs in ("I" holds them as int32): scaled to 8 bits.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_READ_THREADS = 16  # decoding threads per process (Pillow releases the GIL while decoding)
_EVAL_BATCHES_AHEAD = 4


# --------------------------------------------------------------------------- decoding


def list_image_files(path: str | os.PathLike) -> list[storage.Path]:
    """Image files under `path`, a local folder or a `gs://bucket/prefix/` (recursively,
    extensions in any case), sorted by path.

    Sorting makes the order, and therefore shuffles and shards, the same on every host.
    """
    root = storage.reachable(path)
    if not storage.within_deadline(root.is_dir, str(root)):
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist or is not a folder; set data.path to a "
            f"folder holding {'/'.join(IMAGE_EXTENSIONS)} files"
        )
    if storage.is_remote(root):
        files = storage.within_deadline(lambda: _remote_files(root), str(root))
    else:
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise FileNotFoundError(
            f"no images under {str(root)!r}: searched recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case); point data.path at a folder of images"
        )
    return sorted(files, key=lambda p: p.as_posix())


def _remote_files(root: storage.Path) -> list[storage.Path]:
    """The image objects under a gs:// prefix, from one recursive listing (a per-file
    `is_file` would be one request per image)."""
    prefix = str(root)[len(storage.REMOTE_PREFIX) :].rstrip("/")
    found = []
    for folder, _, names in root.walk():
        relative = str(folder)[len(prefix) :].strip("/")
        base = root / relative if relative else root
        found += [base / name for name in names if pathlib.PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS]
    return found


class UnreadableImage(ValueError):
    """An image that cannot be decoded; the message says why, in one line."""


def _open_rgb(data: bytes | str | os.PathLike, *, exif_transpose: bool = False) -> Image.Image:
    """Bytes or a path -> a loaded RGB Pillow image. Raises UnreadableImage saying why not."""
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0:
        raise UnreadableImage("empty file")
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as image:
            image.load()  # decode now: truncation and corruption surface here, not later
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Exception as error:  # noqa: BLE001
        # Pillow's format plugins raise many types on bad input (OSError, SyntaxError,
        # ValueError, EOFError, struct.error, DecompressionBombError, ...): any of them means
        # this file is unusable, and the pipeline's contract is to skip it, saying why.
        raise UnreadableImage(one_line(error)) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is dropped (as PIL's `convert("RGB")` in the reference
    loaders does); 16-bit grayscale is scaled to 8 bits instead of being clipped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(gray).convert("RGB")  # (H, W) uint8 -> L -> RGB
    if image.mode == "RGB":
        return image.copy()  # detach from the (closing) file
    return image.convert("RGB")  # L, 1, P, PA, LA, RGBA, CMYK, YCbCr, ...


def decode_image(data: bytes | str | os.PathLike, *, exif_transpose: bool = False) -> np.ndarray | None:
    """Encoded bytes or a file path -> RGB uint8 (H, W, 3), or None if unreadable.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images all become RGB uint8.
    `exif_transpose=True` applies the EXIF orientation tag (the reference protocol does not).
    """
    try:
        return np.asarray(_open_rgb(data, exif_transpose=exif_transpose))
    except UnreadableImage:
        return None


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """A decoded tfds image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB; any other
    array raises UnreadableImage naming its dtype and shape."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise UnreadableImage(
            f"a {array.dtype} array of shape {array.shape} is no image (expected uint8 (H, W) or (H, W, 1|3|4))"
        )
    if array.ndim == 3:
        array = array[..., 0] if array.shape[-1] == 1 else array[..., :3]
    return Image.fromarray(array).convert("RGB")


# --------------------------------------------------------------------------- transforms


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that min(H, W) == size; the long side becomes int(size * long / short)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3) from the middle; offsets round((H - size) / 2)."""
    height, width = image.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3) at an offset drawn uniformly from `rng`."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1), any shape."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# --------------------------------------------------------------------------- pipeline steps
# Module-level callables (not lambdas): grain pickles the pipeline into worker processes.


class Skipped(NamedTuple):
    """Stands in a pipeline for an image that could not be decoded, and says why."""

    name: str
    reason: str


class _FolderRecord:
    """A path string -> (name, payload) for `_DecodeResize`: the path itself for a local file
    (Pillow reads it), the object's bytes for a gs:// one (read in grain's read threads; an
    object that cannot be read is skipped like an undecodable file)."""

    def __call__(self, path: str) -> tuple[str, str | bytes | Skipped]:
        if not storage.is_remote(path):
            return path, path
        try:
            return path, storage.path(path).read_bytes()
        except OSError as error:
            return path, Skipped(path, f"could not be read ({one_line(error)})")


class _TfdsRecord:
    """(source index, tfds record) -> (name, payload): the name is the record's `file_name`
    feature when it has one (ImageNet does), else `dataset/split[index]`."""

    def __init__(self, image_key: str, prefix: str):
        self.image_key = image_key
        self.prefix = prefix

    def __call__(self, index: int, record: dict[str, Any]) -> tuple[str, Any]:
        name = record.get("file_name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return (str(name) if name else f"{self.prefix}[{index}]"), record[self.image_key]


class _DecodeResize:
    """(name, bytes | path | uint8 array | Skipped) -> uint8 (h, w, 3) with min(h, w) == size,
    or Skipped(name, why) when the image cannot be decoded."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, item: tuple[str, Any]) -> np.ndarray | Skipped:
        name, payload = item
        if isinstance(payload, Skipped):
            return payload
        try:
            image = _array_to_rgb(payload) if isinstance(payload, np.ndarray) else _open_rgb(payload)
        except UnreadableImage as error:
            return Skipped(name, str(error))
        return np.asarray(resize_shorter_side(image, self.size))


class _CenterCrop:
    """uint8 (h, w, 3) -> (size, size, 3) from the middle; Skipped passes through."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray | Skipped) -> np.ndarray | Skipped:
        return image if isinstance(image, Skipped) else np.ascontiguousarray(center_crop(image, self.size))


class _RandomCrop:
    """A grain random map: the rng is derived from the pipeline seed and the element index,
    so a crop depends only on (seed, position in the stream), not on timing or workers."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray | Skipped, rng: np.random.Generator) -> np.ndarray | Skipped:
        if isinstance(image, Skipped):
            return image
        return np.ascontiguousarray(random_crop(image, self.size, rng))


class _SkippingBatchDataset(grain.IterDataset):
    """Batches of `batch_size` decoded images, passing over `Skipped` markers.

    Yields {"image": uint8 (B, S, S, 3), "skipped": [the Skipped met while filling it]}. The
    state is the parent's: it is read between batches, when every element consumed so far
    is in a batch already returned, so restoring it resumes at the next batch exactly.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, give_up_after: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._give_up_after = give_up_after

    def __iter__(self) -> grain.DatasetIterator:
        return _SkippingBatchIterator(self._parent.__iter__(), self._batch_size, self._give_up_after)

    def __str__(self) -> str:
        return f"SkippingBatchDataset(batch_size={self._batch_size})"


class _SkippingBatchIterator(grain.DatasetIterator):
    """The iterator of `_SkippingBatchDataset`; its state is its parent's."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, give_up_after: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._give_up_after = give_up_after
        self._skips_in_a_row = 0

    def __next__(self) -> dict[str, Any]:
        images: list[np.ndarray] = []
        skipped: list[Skipped] = []
        while len(images) < self._batch_size:
            element = next(self._parent)  # endless for training; StopIteration passes on
            if isinstance(element, Skipped):
                skipped.append(element)
                self._note_skip(element.name)
            else:
                images.append(element)
                self._skips_in_a_row = 0
        return {"image": np.stack(images), "skipped": skipped}  # (B, S, S, 3) uint8

    def _note_skip(self, name: str) -> None:
        # An endless stream of unreadable files would otherwise spin forever.
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self._give_up_after:
            raise ConfigError(
                f"{self._skips_in_a_row} unreadable images in a row (the last {name!r}), more "
                f"than the {self._give_up_after} images of this shard: none of them decodes; "
                "check data.path / data.name and the files themselves"
            )

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._skips_in_a_row = 0


class _PadEvalBatch:
    """grain batch_fn: a list of images / Skipped markers -> {"image": uint8 (B, S, S, 3)
    with the real images first and zeros after, "count": n_real, "skipped": [Skipped]}."""

    def __init__(self, batch_size: int, size: int):
        self.batch_size = batch_size
        self.size = size

    def __call__(self, elements: Sequence[np.ndarray | Skipped]) -> dict[str, Any]:
        images = [e for e in elements if not isinstance(e, Skipped)]
        skipped = [e for e in elements if isinstance(e, Skipped)]
        batch = np.zeros((self.batch_size, self.size, self.size, 3), np.uint8)
        if images:
            batch[: len(images)] = np.stack(images)
        return {"image": batch, "count": len(images), "skipped": skipped}


# --------------------------------------------------------------------------- sources


def _data_config(cfg: Config) -> DataConfig:
    if cfg.data is None:
        raise ValueError(
            "the config has no data section; set data.source=folder data.path=DIR or data.source=tfds data.name=NAME"
        )
    return cfg.data


def _tfds_records(data: DataConfig, split: str) -> grain.MapDataset:
    """`data.name`/`split` as a MapDataset of (name, encoded bytes or uint8 array)."""
    import tensorflow_datasets as tfds  # slow to import, and only this source needs it

    where = f"data.dir={data.dir!r}" if data.dir else "tfds' default data_dir"
    try:
        builder = tfds.builder(data.name, data_dir=data.dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"tfds dataset data.name={data.name!r} not found in {where}; check the name, or set "
            "data.dir to the folder it was prepared in"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {data.name!r} is not prepared in {builder.data_dir}; prepare it as "
            f"array_record first (`tfds build {data.name} --file_format=array_record "
            f"--data_dir=DIR`) and set data.dir=DIR"
        )
    features = builder.info.features
    if data.image_key not in features:
        raise ValueError(
            f"data.image_key={data.image_key!r} is not a feature of {data.name!r}; it has {sorted(features.keys())}"
        )
    decoders = None
    if isinstance(features[data.image_key], tfds.features.Image):
        # Raw bytes, decoded by Pillow here: a corrupt record is then skipped (tfds would
        # raise inside the source), and folder and tfds images go through the same decoder.
        decoders = {data.image_key: tfds.decode.SkipDecoding()}
    try:
        source = builder.as_data_source(split=split, decoders=decoders)
    except ValueError as error:  # e.g. an unknown split: tfds lists the known ones
        raise ValueError(f"tfds dataset {data.name!r}, split {split!r}: {error}") from None
    record = _TfdsRecord(data.image_key, prefix=f"{data.name}/{split}")
    return grain.MapDataset.source(source).map_with_index(record)


def _folder_records(data: DataConfig) -> grain.MapDataset:
    """The image files under `data.path` as a MapDataset of (path, path)."""
    files = [str(p) for p in list_image_files(data.path)]
    return grain.MapDataset.source(files).map(_FolderRecord())


def _records(data: DataConfig, split: str) -> grain.MapDataset:
    if data.source == "tfds":
        return _tfds_records(data, split)
    return _folder_records(data)


def _shard(records: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's elements: every process_count-th one from process_index (disjoint,
    covering, sizes differ by at most one)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count}); pass "
            "jax.process_index() and jax.process_count()"
        )
    return records[process_index::process_count]


def _local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes, "
            f"each of which reads batch_size // process_count images; use train.batch_size="
            f"{max(process_count, global_batch // process_count * process_count)}"
        )
    return global_batch // process_count


def _read_options(data: DataConfig, elements_ahead: int) -> grain.ReadOptions:
    """Reader threads per process decoding `elements_ahead` elements ahead; data.prefetch=0
    reads synchronously (handy when debugging a decoder)."""
    if data.prefetch == 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=min(_READ_THREADS, elements_ahead), prefetch_buffer_size=elements_ahead)


def _maybe_multiprocess(dataset: grain.IterDataset, data: DataConfig) -> grain.IterDataset:
    """`data.workers` decoding processes, each reading `data.prefetch` batches ahead."""
    if data.workers == 0:
        return dataset
    from absl import flags  # grain reads absl flags in workers; outside an absl app they
    # are unparsed and mp_prefetch fails with UnparsedFlagAccessError.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=data.workers, per_worker_buffer_size=max(1, data.prefetch))
    return dataset.mp_prefetch(options)


def _derived_seeds(seed: int, process_index: int) -> tuple[int, int]:
    """Independent (shuffle, crop) seeds per process: shards differ, but equal crop offsets
    at equal positions on every host would still correlate the global batch."""
    shuffle_seed, crop_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
    return int(shuffle_seed), int(crop_seed)


# --------------------------------------------------------------------------- iterators


class _SkipLog:
    """Unreadable images met so far (each file once, in order of discovery)."""

    def __init__(self) -> None:
        self.files: dict[str, None] = {}  # an ordered set

    def add(self, skipped: Sequence[Skipped]) -> None:
        for name, reason in skipped:
            if name not in self.files:
                self.files[name] = None
                logger.warning("skipped unreadable image %s: %s (%d skipped so far)", name, reason, len(self.files))

    def report(self) -> dict[str, Any]:
        return {"skipped": len(self.files), "files": list(self.files)}


def _close_quietly(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class _ClosingIterator:
    """Owns a grain iterator: `close()`, a context manager, and a close at interpreter exit
    (weakref.finalize runs before module teardown, where grain's own `__del__` would fail)."""

    def __init__(self, iterator: grain.DatasetIterator):
        self._iterator = iterator
        self._finalizer = weakref.finalize(self, _close_quietly, iterator)

    def close(self) -> None:
        """Stops reader threads and worker processes; idempotent."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self):
        return self


class TrainIterator(_ClosingIterator):
    """Endless per-process training batches: float32 (B_local, S, S, 3) in [-1, 1]."""

    def __init__(self, dataset: grain.IterDataset, spec: dict[str, Any]):
        super().__init__(iter(dataset))
        self._spec = spec
        self._skips = _SkipLog()

    def __next__(self) -> np.ndarray:
        batch = next(self._iterator)
        self._skips.add(batch["skipped"])
        # uint8 through the pipeline (4x less to buffer and to send from workers); float here.
        return to_unit_range(batch["image"])

    def get_state(self) -> dict[str, Any]:
        """JSON-able position in the stream (plus the skipped files and what it was built for)."""
        state = {
            "format": STATE_FORMAT,
            "spec": self._spec,
            "grain": self._iterator.get_state(),
            "skipped_files": list(self._skips.files),
        }
        # Round-trip now, so what Orbax's JsonSave stores is what set_state is tested with.
        return json.loads(json.dumps(state))

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at the batch after the one `get_state()` was taken behind."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a data-iterator state of format {STATE_FORMAT!r} (keys "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}); pass what "
                "TrainIterator.get_state() returned"
            )
        changed = {k: (v, self._spec.get(k)) for k, v in state["spec"].items() if self._spec.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"the data-iterator state was saved for a different pipeline ({details}); resume with "
                "the settings it was saved with (train.batch_size, seed, data.*, the number of "
                "processes), or train in a fresh workdir=NEW_DIR"
            )
        self._iterator.set_state(state["grain"])
        self._skips = _SkipLog()
        self._skips.files = dict.fromkeys(state["skipped_files"])

    def skipped(self) -> dict[str, Any]:
        """{"skipped": number of distinct unreadable files met, "files": their names}."""
        return self._skips.report()


class EvalIterator(_ClosingIterator):
    """Finite eval batches (float32 (B, size, size, 3), n_real), padded to `num_batches`."""

    def __init__(self, dataset: grain.IterDataset, *, num_batches: int, batch_size: int, size: int):
        super().__init__(iter(dataset))
        self.num_batches = num_batches  # the same on every process
        self._batch_shape = (batch_size, size, size, 3)
        self._served = 0
        self._skips = _SkipLog()

    def __len__(self) -> int:
        return self.num_batches

    def __next__(self) -> tuple[np.ndarray, int]:
        if self._served >= self.num_batches:
            raise StopIteration
        self._served += 1
        batch = next(self._iterator, None)
        if batch is None:  # this shard is shorter than the longest one: pure padding
            return np.zeros(self._batch_shape, np.float32), 0
        self._skips.add(batch["skipped"])
        images = to_unit_range(batch["image"])
        images[batch["count"] :] = 0.0
        return images, int(batch["count"])

    def skipped(self) -> dict[str, Any]:
        """{"skipped": number of unreadable files met, "files": their names}."""
        return self._skips.report()


def train_iterator(cfg: Config, *, seed: int, process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """This process's endless training batches, float32 (B_local, S, S, 3) in [-1, 1].

    The shard (every process_count-th image from process_index) is shuffled with `seed`
    (reshuffled every epoch) when `data.shuffle`, repeated forever, decoded and resized,
    cropped, and batched with drop_remainder. The same seed gives the same batches.
    """
    data = _data_config(cfg)
    local_batch = _local_batch_size(cfg.train.batch_size, process_count)
    size = cfg.train.image_size
    shard = _shard(_records(data, data.split), process_index, process_count)
    if len(shard) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets no training images: the source "
            "has fewer images than processes; use more data or fewer processes"
        )
    shuffle_seed, crop_seed = _derived_seeds(seed, process_index)
    dataset = shard.shuffle(seed=shuffle_seed) if data.shuffle else shard
    dataset = dataset.repeat(None)  # endless; the shuffle is reseeded every epoch
    resize = data.resize or size  # resize > size: training on crops (patches) of larger images
    dataset = dataset.map(_DecodeResize(resize))
    if data.crop == "random":
        dataset = dataset.random_map(_RandomCrop(size), seed=crop_seed)
    else:
        dataset = dataset.map(_CenterCrop(size))
    dataset = dataset.to_iter_dataset(_read_options(data, data.prefetch * local_batch))
    dataset = _SkippingBatchDataset(dataset, local_batch, give_up_after=len(shard))
    dataset = _maybe_multiprocess(dataset, data)
    spec = {
        "source": data.source,
        "data": (str(storage.path(data.path)) if data.source == "folder" else f"{data.name}/{data.split}"),
        "images": len(shard),
        "seed": seed,
        "process_index": process_index,
        "process_count": process_count,
        "batch_size": local_batch,
        "image_size": size,
        "resize": resize,
        "crop": data.crop,
        "shuffle": data.shuffle,
        "workers": data.workers,
    }
    return TrainIterator(dataset, spec)


def eval_batches(
    cfg: Config,
    *,
    size: int = 256,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
) -> EvalIterator:
    """This process's eval batches: (float32 (batch_size, size, size, 3), n_real).

    Reads `data.eval_split` (tfds) or the folder in order, without shuffling; `limit`
    keeps the first `limit` images of the whole split before it is sharded. Resize shorter
    side to `size` (bicubic), center crop. Rows past n_real are zeros; unreadable images
    are left out of n_real (and reported by `.skipped()`).
    """
    data = _data_config(cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    records = _records(data, data.eval_split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be a positive number of images, or None for all")
        records = records[:limit]
    shard = _shard(records, process_index, process_count)
    # Every process runs the same number of batches (the longest shard's), so collective
    # metric reductions over hosts never wait on a process that has finished.
    num_batches = math.ceil(math.ceil(len(records) / process_count) / batch_size)
    # Batched before to_iter_dataset: worker processes then get whole batches in order.
    dataset = shard.map(_DecodeResize(size)).map(_CenterCrop(size))
    dataset = dataset.batch(batch_size, drop_remainder=False, batch_fn=_PadEvalBatch(batch_size, size))
    # Eval elements are whole batches, each decoded by one thread: keep several in flight.
    dataset = dataset.to_iter_dataset(_read_options(data, max(data.prefetch, _EVAL_BATCHES_AHEAD)))
    dataset = _maybe_multiprocess(dataset, data)
    return EvalIterator(dataset, num_batches=num_batches, batch_size=batch_size, size=size)
