"""The evaluation modes and the one batch loop they share: data -> encode/decode -> per-image
values -> float64 sums merged over processes -> report. `evaluate(...)` (reconstruction metrics)
is what eval.py runs by default; `latent_statistics`, `robustness` and `latent_figure_data` are
its other modes.

Every mode is a compiled per-batch function that returns per-image values (first axis: the batch)
and a host-side part that uses them. `_EvalLoop` runs it: per batch, every process takes its own
real rows of those values (the padding rows of a last, partial batch are dropped) and adds them up
in float64: the metric sums, and for rFID the feature sums and sums of outer products. At the end
those float64 sums are added over the processes, once, in process order. So the merge adds nothing
but float64 rounding: several hosts give what one host gives when the model computes each image
alike. (XLA may round an image's float32 values differently when a device holds a different number
of rows; and a sampled posterior draws its noise per batch, so its figures depend on how images
fall into batches.)

With several processes every process reads its own share of the images (`data.eval_batches`),
all of them run the same number of batches (a process whose share has run out runs pure
padding), every one returns the same report, and process 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sigmavae_jax import data, metrics, parallel, storage, viz
from sigmavae_jax.api import Codec
from sigmavae_jax.config import Config

FEATURE_DIM = 2048  # FID Inception pool features
_FEATURE_ROWS_PER_UPDATE = 1024  # features are added to the float64 sums in blocks of this many rows
_MERGE_WORDS = 1 << 21  # uint32 words (8 MiB) per process in one all-gather of the float64 sums


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What the reference table's protocol leaves open."""

    num_images: int | None = None  # None: the whole split / folder
    batch_size: int = 32  # global, over all devices and processes
    size: int = 256  # resize shorter side (bicubic) + center crop
    sample_posterior: bool = False  # the reference sampled SDXL/FLUX posteriors
    fid_rounding: str = "truncate"  # "truncate" (reference) or "round" to uint8 for rFID
    seed: int = 0  # posterior samples
    save_reconstructions: int = 0  # write this many original | reconstruction pairs as PNG


# (replicated variables, global images (B, H, W, 3), key) -> per-image values, each with first axis B
BatchValues = Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]


def _mesh_and_local_batch(settings: EvalSettings):
    """The (data, fsdp) mesh over every device, and this process's share of the batch. Raises
    ValueError unless settings.batch_size is a multiple of the device count."""
    mesh = parallel.make_mesh(-1, 1)
    if settings.batch_size % mesh.size:
        fits = max(mesh.size, settings.batch_size // mesh.size * mesh.size)
        raise ValueError(
            f"batch size {settings.batch_size} (--batch-size) must be a multiple of the {mesh.size} devices; use {fits}"
        )
    return mesh, settings.batch_size // jax.process_count()


def _eval_batches(cfg: Config, settings: EvalSettings, local_batch: int) -> data.EvalIterator:
    return data.eval_batches(
        cfg,
        size=settings.size,
        batch_size=local_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        limit=settings.num_images,
    )


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order they were given."""
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def _merged_skips(report: dict[str, Any]) -> dict[str, Any]:
    """The unreadable-image reports of all processes as one (files in process order)."""
    if jax.process_count() == 1:
        return report
    files = list(dict.fromkeys(name for one in parallel.gather_json(report) for name in one["files"]))
    return {"skipped": len(files), "files": files}


class _Batch:
    """One batch as this process sees it: `images`, its real rows (count, H, W, 3), float32 in
    [-1, 1]; `count`; and `batch[name]`, its real rows of the per-image output `name` as a numpy
    array. An output is copied from the devices when it is first asked for, so one that is read
    only now and then (a reconstruction, for a few PNGs) stays on them otherwise."""

    def __init__(self, images: np.ndarray, count: int, values: dict[str, jax.Array]):
        self.images, self.count = images[:count], count
        self._values = values
        self._rows: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._rows:
            self._rows[name] = _local_rows(self._values[name])[: self.count]  # padding rows dropped
        return self._rows[name]


class _EvalLoop:
    """The batch loop of every mode. `batch_values` is compiled once, its outputs split over the
    devices like the batch; `variables` (any pytree, e.g. a tuple of the model's and the metric
    networks' variables) are replicated onto every device once. Iterating (once: the data reader
    closes at the end) gives one `_Batch` per batch of this process's share of cfg.data, in order;
    batch i runs with the key
    `fold_in(key(settings.seed), i)`. Padding rows are computed like the others (and may hold inf)
    but never reach the caller. Every process runs the same number of batches; the progress bar
    shows on process 0 alone, and only with `progress`. Raises ValueError when settings.batch_size
    is not a multiple of the device count."""

    def __init__(
        self, cfg: Config, settings: EvalSettings, batch_values: BatchValues, variables: Any, *, progress: bool = True
    ):
        self._mesh, local_batch = _mesh_and_local_batch(settings)
        self._step = jax.jit(batch_values, out_shardings=parallel.batch_sharding(self._mesh))
        self._variables = jax.device_put(variables, parallel.replicated(self._mesh))
        self._seed = settings.seed
        self._batches = _eval_batches(cfg, settings, local_batch)
        self._bar = tqdm(
            total=len(self._batches),
            unit="batch",
            dynamic_ncols=True,
            disable=not (progress and jax.process_index() == 0),
        )

    def __iter__(self) -> Iterator[_Batch]:
        key = jax.random.key(self._seed)
        with self._batches, self._bar:
            for index, (images, count) in enumerate(self._batches):
                values = self._step(
                    self._variables, parallel.global_batch(images, self._mesh), jax.random.fold_in(key, index)
                )
                yield _Batch(images, count, values)
                self._bar.update(1)

    def show(self, **postfix: Any) -> None:
        """Shows `postfix` (running figures) beside the progress bar."""
        self._bar.set_postfix(postfix)

    def skipped(self) -> dict[str, Any]:
        """{"skipped": number of unreadable files, "files": their names}, over all processes (in
        process order; every process gets the same). With several processes every one must call it."""
        return _merged_skips(self._batches.skipped())


def _no_image(cfg: Config) -> ValueError:
    """The error for data that gave no image: where it looked, and what to check."""
    source = cfg.data
    where = (
        f"the image folder data.path={source.path}"
        if source.source == "folder"
        else f"tfds data.name={source.name} data.eval_split={source.eval_split}"
    )
    return ValueError(f"no readable image in {where}; files that could not be decoded were named in warnings above")


def _add_rows(totals: dict[str, Any], batch: _Batch, names: Iterable[str]) -> None:
    """Adds to `totals` the batch's image count ("count") and, per name, its rows summed over the
    images in float64 (an array of one image's shape)."""
    totals["count"] = totals.get("count", 0.0) + batch.count
    for name in names:
        totals[name] = totals.get(name, 0.0) + np.sum(batch[name], axis=0, dtype=np.float64)


def _merged_row_sums(loop: _EvalLoop, names: Iterable[str]) -> dict[str, np.ndarray]:
    """`_add_rows` over every batch of `loop`, then summed over the processes (the same on each)."""
    totals: dict[str, Any] = {"count": 0.0}
    for batch in loop:
        _add_rows(totals, batch, names)
    return sum_over_processes(totals)


def _latent(model, settings: EvalSettings, images: jax.Array, key: jax.Array) -> jax.Array:
    """The latent the settings ask for: a posterior sample (settings.sample_posterior) or the mode."""
    posterior = model.posterior(images)
    return posterior.sample(key) if settings.sample_posterior else posterior.mode()


def _metric_values(codec: Codec, settings: EvalSettings, lpips_graph, inception_graph) -> BatchValues:
    """((params, lpips vars, inception vars), images, key) -> per-image "psnr", "ssim" (B,), "lpips"
    (B,) with an LPIPS, the Inception features "real", "fake" (B, 2048) with an Inception, and the
    reconstruction "x_hat" (B, H, W, 3)."""

    def batch_values(variables, images, key):
        params, lpips_vars, inception_vars = variables
        model = nnx.merge(codec.graphdef, params)
        x_hat = model.decode(_latent(model, settings, images, key))
        a01, b01 = metrics.to_unit_range(images), metrics.to_unit_range(x_hat)
        values = {"psnr": metrics.psnr(a01, b01), "ssim": metrics.ssim(a01, b01), "x_hat": x_hat}
        if lpips_graph is not None:  # inputs in [-1, 1], reconstruction not clamped
            values["lpips"] = nnx.merge(lpips_graph, lpips_vars)(images, x_hat)
        if inception_graph is not None:
            inception = nnx.merge(inception_graph, inception_vars)
            for name, x01 in (("real", a01), ("fake", b01)):
                values[name] = inception(metrics.quantize_uint8(x01, settings.fid_rounding)).astype(jnp.float32)
        return values

    return batch_values


def _graph_and_variables(module) -> tuple[Any, Any]:
    return nnx.split(module) if module is not None else (None, None)


class _FeatureSums:
    """The float64 feature count, sum and sum of outer products of one process's images, fed a
    batch of rows at a time and added up in blocks of `_FEATURE_ROWS_PER_UPDATE` rows (one
    float64 matrix product per block, instead of one per batch)."""

    def __init__(self) -> None:
        self.stats = metrics.FeatureStats(FEATURE_DIM)
        self._pending: list[np.ndarray] = []
        self._rows = 0

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self._pending.append(np.asarray(rows, np.float32))
            self._rows += len(rows)
        if self._rows >= _FEATURE_ROWS_PER_UPDATE:
            self.flush()

    def flush(self) -> metrics.FeatureStats:
        if self._pending:
            self.stats.update(np.concatenate(self._pending))
            self._pending, self._rows = [], 0
        return self.stats


def sum_over_processes(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`values` (float64 arrays with the same names and shapes on every process) added up over
    all processes in process order; every process gets the same result. The float64 bits travel
    as uint32 words (JAX computes without 64-bit types here), in pieces of `_MERGE_WORDS` words
    per process, so no device holds more than process_count * 8 MiB of them at once."""
    values = {name: np.asarray(value, np.float64) for name, value in values.items()}
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    names = sorted(values)
    words = np.concatenate([values[name].ravel() for name in names]).view(np.uint32)
    total = np.empty(words.size // 2, np.float64)
    for start in range(0, words.size, _MERGE_WORDS):
        piece = np.asarray(multihost_utils.process_allgather(words[start : start + _MERGE_WORDS]))
        parts = np.ascontiguousarray(piece.reshape(jax.process_count(), -1)).view(np.float64)  # (processes, n)
        merged = parts[0].copy()
        for row in parts[1:]:  # in process order, the same on every process
            merged += row
        total[start // 2 : start // 2 + merged.size] = merged
    out, offset = {}, 0
    for name in names:
        size = values[name].size
        out[name] = total[offset : offset + size].reshape(values[name].shape)
        offset += size
    return out


def evaluate(
    codec: Codec,
    cfg: Config,
    settings: EvalSettings,
    *,
    lpips=None,
    inception=None,
    reference_stats: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruction metrics of `codec` over cfg.data (its eval split, or the folder).

    lpips: an LPIPS module (None: no LPIPS). inception: an FID Inception module mapping
    (B, H, W, 3) in [0, 1] to (B, 2048) (None: no rFID). reference_stats: an .npz with the
    originals' Inception statistics (mu, sigma, count, settings), read if it exists and
    written otherwise. out_dir receives eval.json and the reconstruction PNGs. Both paths may be
    local or gs://. Returns the report dict, the same on every process; only process 0 writes
    files (with several processes, its PNGs show the first images of its own share). Raises
    ValueError when no image is readable or the batch size does not split over the devices.
    """
    writer = jax.process_index() == 0
    reference_stats = storage.reachable(reference_stats) if reference_stats is not None else None
    cached_reference = read_reference(reference_stats, settings) if inception is not None else None
    out_dir = storage.reachable(out_dir) if out_dir is not None else None
    lpips_graph, lpips_vars = _graph_and_variables(lpips)
    inception_graph, inception_vars = _graph_and_variables(inception)
    loop = _EvalLoop(
        cfg,
        settings,
        _metric_values(codec, settings, lpips_graph, inception_graph),
        (codec.params, lpips_vars, inception_vars),
        progress=progress,
    )
    names = ("psnr", "ssim", "lpips") if lpips is not None else ("psnr", "ssim")
    sums: dict[str, Any] = {"count": 0.0}
    features = {"real": _FeatureSums(), "fake": _FeatureSums()} if inception is not None else {}
    saved = 0
    for batch in loop:
        _add_rows(sums, batch, names)
        for name, feature_sums in features.items():
            feature_sums.add(batch[name])
        if out_dir is not None and writer and saved < settings.save_reconstructions:
            take = min(batch.count, settings.save_reconstructions - saved)
            for i in range(take):
                grid = viz.reconstruction_grid([batch.images[i : i + 1], batch["x_hat"][i : i + 1]])
                viz.save_png(out_dir / "reconstructions" / f"{saved + i:05d}.png", grid)
            saved += take
        loop.show(images=int(sums["count"]), psnr=f"{sums['psnr'] / max(sums['count'], 1):.2f}")
    for name, feature_sums in features.items():
        stats = feature_sums.flush()
        sums[f"{name}_total"], sums[f"{name}_outer"] = stats.total, stats.outer
    sums = sum_over_processes(sums)  # the one cross-process step, after the last batch
    count = int(round(float(sums["count"])))
    if count == 0:
        raise _no_image(cfg)
    report: dict[str, Any] = {
        "images": count,
        "psnr": float(sums["psnr"]) / count,
        "ssim": float(sums["ssim"]) / count,
        "lpips": float(sums["lpips"]) / count if "lpips" in sums else None,
        "rfid": None,
        "settings": dataclasses.asdict(settings),
        "data": cfg.data.model_dump(mode="json") if cfg.data else None,
        "skipped_images": loop.skipped(),
    }
    if inception is not None:
        real, fake = (
            metrics.FeatureStats(FEATURE_DIM).add(count, sums[f"{n}_total"], sums[f"{n}_outer"])
            for n in ("real", "fake")
        )
        mu_real, sigma_real = _reference(real, cached_reference, reference_stats, settings)
        mu_fake, sigma_fake = fake.mean_cov()
        report["rfid"] = metrics.frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
    if out_dir is not None and writer:
        text = json.dumps(report, indent=2, default=str) + "\n"
        storage.write_bytes_atomically(out_dir / "eval.json", text.encode())
    return report


_REFERENCE_KEYS = ("mu", "sigma", "count", "size", "rounding")


def read_reference(path: storage.Path | None, settings: EvalSettings) -> dict[str, np.ndarray] | None:
    """The cached originals' statistics at `path` (None: no such file, or no path), checked before
    any image is read: an .npz written by `evaluate` at the same --size and --fid-rounding.
    Raises ValueError naming the file and the fix otherwise."""
    if path is None or not path.exists():
        return None
    fix = "delete it (it is written again) or pass another --reference-stats"
    if path.is_dir():
        raise ValueError(f"reference statistics {path} is a folder, not an .npz file; {fix}")
    try:
        with np.load(io.BytesIO(path.read_bytes())) as archive:
            cached = {key: archive[key] for key in _REFERENCE_KEYS if key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"reference statistics {path} are not a readable .npz ({error}); {fix}") from None
    missing = [key for key in _REFERENCE_KEYS if key not in cached]
    if missing:
        raise ValueError(f"reference statistics {path} have no {', '.join(missing)}: not written by eval.py; {fix}")
    made_with = {"size": int(cached["size"]), "fid_rounding": str(cached["rounding"])}
    now = {"size": settings.size, "fid_rounding": settings.fid_rounding}
    if made_with != now:
        made = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in made_with.items())
        raise ValueError(f"reference statistics {path} were made with {made}; this evaluation differs; {fix}")
    return cached


def _reference(
    real: metrics.FeatureStats, cached: dict[str, np.ndarray] | None, path: storage.Path | None, settings: EvalSettings
):
    """The originals' statistics: `cached` (from `read_reference`), checked to be over as many
    images, else computed here and written to `path` by process 0 (whole or not at all)."""
    if cached is not None:
        if int(cached["count"]) != real.count:
            raise ValueError(
                f"reference statistics {path} are over {int(cached['count'])} images, this evaluation "
                f"has {real.count}; delete the file or pass a matching --num-images"
            )
        return cached["mu"], cached["sigma"]
    mu, sigma = real.mean_cov()
    if path is not None and jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, sigma=sigma, count=real.count, size=settings.size, rounding=settings.fid_rounding)
        storage.write_bytes_atomically(path, buffer.getvalue())
    return mu, sigma


def markdown_row(name: str, report: dict[str, Any]) -> str:
    """A row of the reference table: | model | rFID | PSNR | SSIM | LPIPS |."""
    show = lambda value, digits: "n/a" if value is None else f"{value:.{digits}f}"  # noqa: E731
    return f"| {name} | " + " | ".join(show(report[key], 3) for key in ("rfid", "psnr", "ssim", "lpips")) + " |"


def latent_statistics(codec: Codec, cfg: Config, settings: EvalSettings, *, progress: bool = True) -> dict[str, Any]:
    """Per-channel and global mean/std of the latents (the posterior mode, or a sample with
    settings.sample_posterior) over cfg.data, and the factors a diffusion model would use:
    shift_factor = global mean, scaling_factor = 1 / global std (so (z - shift) * scale has
    zero mean and unit variance; None when the std is 0). Returns {"positions": int,
    "channel_mean", "channel_std": lists of C floats, "mean", "std", "shift_factor",
    "scaling_factor"}, the same on every process. Raises ValueError when no image is readable."""

    def batch_values(params, images, key):
        z = _latent(nnx.merge(codec.graphdef, params), settings, images, key).astype(jnp.float32)  # (B, h, w, C)
        return {
            "positions": jnp.full(z.shape[:1], z.shape[1] * z.shape[2], jnp.int32),
            "sum": jnp.sum(z, axis=(1, 2)),
            "squares": jnp.sum(z * z, axis=(1, 2)),
        }

    sums = _merged_row_sums(
        _EvalLoop(cfg, settings, batch_values, codec.params, progress=progress), ("positions", "sum", "squares")
    )
    if sums["count"] == 0:
        raise _no_image(cfg)
    count, total, squares = float(sums["positions"]), sums["sum"], sums["squares"]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    global_mean = float(total.sum() / (count * total.size))
    global_std = float(np.sqrt(max(squares.sum() / (count * total.size) - global_mean**2, 0.0)))
    return {
        "positions": int(count),
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "mean": global_mean,
        "std": global_std,
        "shift_factor": global_mean,
        "scaling_factor": 1.0 / global_std if global_std > 0 else None,
    }


ROBUSTNESS_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def _robustness_values(codec: Codec, sigmas, lpips_graph) -> BatchValues:
    """((params, lpips vars), images, key) -> per-image "psnr" and, with an LPIPS, "lpips", each
    (B, len(sigmas)): column j scores the decoding of z + sigmas[j] * std(z) * eps. Each image is
    encoded once; eps ~ N(0, I) is drawn once from `key` and used at every sigma."""
    levels = np.asarray(sigmas, np.float32)

    def batch_values(variables, images, key):
        params, lpips_vars = variables
        model = nnx.merge(codec.graphdef, params)
        z = model.encode(images)  # (B, h, w, c), the posterior mode
        scale = jnp.std(z, axis=(1, 2, 3), keepdims=True)
        eps = jax.random.normal(key, z.shape, z.dtype)

        def scores(sigma):
            x_hat = model.decode(z + sigma * scale * eps)
            values = {"psnr": metrics.psnr(metrics.to_unit_range(images), metrics.to_unit_range(x_hat))}
            if lpips_graph is not None:
                values["lpips"] = nnx.merge(lpips_graph, lpips_vars)(images, x_hat)
            return values

        # lax.map decodes one sigma at a time: the memory of one decoding, however many sigmas
        per_sigma = jax.lax.map(scores, jnp.asarray(levels))  # each (len(sigmas), B)
        return {name: value.T for name, value in per_sigma.items()}

    return batch_values


def robustness(
    codec: Codec, cfg: Config, settings: EvalSettings, *, sigmas=ROBUSTNESS_SIGMAS, lpips=None, progress: bool = True
) -> list[dict[str, float]]:
    """How gracefully the decoder degrades under latent noise: decode z + sigma * std(z) * eps
    (z the posterior mode, std(z) the standard deviation of each image's latent, eps ~ N(0, I),
    one draw per batch shared by every sigma) for every sigma, and average PSNR (and LPIPS) of
    the decodings against the originals, summed in float64 and merged over processes.
    Returns [{"sigma", "psnr", "lpips" (None without an LPIPS)}] in the order of `sigmas`, the
    same on every process. Raises ValueError when no image is readable."""
    lpips_graph, lpips_vars = _graph_and_variables(lpips)
    loop = _EvalLoop(
        cfg, settings, _robustness_values(codec, sigmas, lpips_graph), (codec.params, lpips_vars), progress=progress
    )
    sums = _merged_row_sums(loop, ("psnr", "lpips") if lpips is not None else ("psnr",))
    count = float(sums["count"])
    if count == 0:
        raise _no_image(cfg)
    return [
        {
            "sigma": float(sigma),
            "psnr": float(sums["psnr"][i]) / count,
            "lpips": float(sums["lpips"][i]) / count if lpips is not None else None,
        }
        for i, sigma in enumerate(sigmas)
    ]


def latent_figure_data(
    codec: Codec,
    cfg: Config,
    settings: EvalSettings,
    *,
    num_shown: int = 4,
    max_values: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """What the latent figures need from one model over cfg.data (the latent is the posterior
    mode, or a sample with settings.sample_posterior, unscaled):

    "images", "reconstructions" (num_shown, H, W, 3) and "latents" (num_shown, h, w, C) of the
    first num_shown images, for `viz.latent_pca_figure`; "values" (<= max_values, C): latent
    positions drawn uniformly without replacement over all images (all of them when there are
    no more than max_values; reservoir sampling, settings.seed), for `viz.latent_histogram_figure`;
    "positions": how many latent positions were seen. With several processes each one samples
    its own images. Raises ValueError when num_shown or max_values is below 1 or no image is
    readable."""
    if num_shown < 1 or max_values < 1:
        raise ValueError(f"num_shown={num_shown} and max_values={max_values} must both be at least 1")

    def batch_values(params, images, key):
        return {"z": _latent(nnx.merge(codec.graphdef, params), settings, images, key)}

    rng = np.random.default_rng(settings.seed)
    shown: dict[str, list[np.ndarray]] = {"images": [], "reconstructions": [], "latents": []}
    reservoir, seen = None, 0
    for batch in _EvalLoop(cfg, settings, batch_values, codec.params, progress=progress):
        z = batch["z"]
        have = sum(len(a) for a in shown["images"])
        if have < num_shown:
            take = min(num_shown - have, batch.count)
            shown["images"].append(batch.images[:take])
            shown["reconstructions"].append(np.asarray(codec.decode(z[:take]), np.float32))  # only these are decoded
            shown["latents"].append(z[:take].astype(np.float32))
        rows = z.reshape(-1, z.shape[-1])
        if reservoir is None:
            reservoir = np.empty((max_values, rows.shape[1]), np.float32)
        fill = min(max(max_values - seen, 0), len(rows))  # the reservoir's free places
        reservoir[seen : seen + fill] = rows[:fill]
        if fill < len(rows):  # row i (0-based over all rows) replaces a uniform slot with probability max_values/(i+1)
            slots = rng.integers(0, np.arange(seen + fill, seen + len(rows)) + 1)
            keep = slots < max_values
            reservoir[slots[keep]] = rows[fill:][keep]
        seen += len(rows)
    if seen == 0:
        raise _no_image(cfg)
    figure_data = {name: np.concatenate(parts) for name, parts in shown.items()}
    figure_data["values"] = reservoir[: min(seen, max_values)]
    figure_data["positions"] = seen
    return figure_data
