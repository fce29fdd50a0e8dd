"""The evaluation loop (DESIGN section 9): data -> encode/decode -> metrics merged over
devices and processes -> report. `evaluate(...)` is what eval.py calls.

Per batch, one compiled function returns masked SUMS (PSNR, SSIM, LPIPS, and for rFID the
Inception feature sums and outer products of originals and reconstructions); the host adds
them up in float64, so padding rows of the last batch never count and the result does not
depend on how images were split over batches, devices or processes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sigmavae_jax import data, metrics, parallel, viz
from sigmavae_jax.api import Codec
from sigmavae_jax.config import Config


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What the reference table's protocol leaves open (DESIGN section 9)."""

    num_images: int | None = None  # None: the whole split / folder
    batch_size: int = 32  # global, over all devices and processes
    size: int = 256  # resize shorter side (bicubic) + center crop
    sample_posterior: bool = False  # the reference sampled SDXL/FLUX posteriors
    fid_rounding: str = "truncate"  # "truncate" (reference) or "round" to uint8 for rFID
    seed: int = 0  # posterior samples
    save_reconstructions: int = 0  # write this many original | reconstruction pairs as PNG


def _batch_function(codec: Codec, settings: EvalSettings, lpips_graph, inception_graph):
    def batch_metrics(params, lpips_vars, inception_vars, images, mask, key):
        model = nnx.merge(codec.graphdef, params)
        posterior = model.posterior(images)
        z = posterior.sample(key) if settings.sample_posterior else posterior.mode()
        x_hat = model.decode(z)
        a01, b01 = metrics.to_unit_range(images), metrics.to_unit_range(x_hat)
        real = mask > 0

        def masked_sum(values):  # padding rows may hold inf/nan (e.g. PSNR of equal images)
            return jnp.sum(jnp.where(real, values, 0.0))

        sums = {"psnr": masked_sum(metrics.psnr(a01, b01)), "ssim": masked_sum(metrics.ssim(a01, b01)), "count": jnp.sum(mask)}
        if lpips_graph is not None:  # inputs in [-1, 1], reconstruction not clamped
            sums["lpips"] = masked_sum(nnx.merge(lpips_graph, lpips_vars)(images, x_hat))
        if inception_graph is not None:
            inception = nnx.merge(inception_graph, inception_vars)
            for name, x01 in (("real", a01), ("fake", b01)):
                features = inception(metrics.quantize_uint8(x01, settings.fid_rounding))  # (B, 2048)
                features = jnp.where(real[:, None], features, 0.0)
                sums[f"{name}_total"] = jnp.sum(features, axis=0)
                sums[f"{name}_outer"] = jnp.matmul(features.T, features, precision=jax.lax.Precision.HIGHEST)
        return sums, x_hat

    return batch_metrics


def _split(module) -> tuple[Any, Any]:
    return nnx.split(module) if module is not None else (None, None)


def evaluate(
    codec: Codec,
    cfg: Config,
    settings: EvalSettings,
    *,
    lpips=None,
    inception=None,
    reference_stats: pathlib.Path | None = None,
    out_dir: pathlib.Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruction metrics of `codec` over cfg.data (its eval split, or the folder).

    lpips: an LPIPS module (None: no LPIPS). inception: an FID Inception module mapping
    (B, H, W, 3) in [0, 1] to (B, 2048) (None: no rFID). reference_stats: an .npz with the
    originals' Inception statistics (mu, sigma, count, settings), read if it exists and
    written otherwise. Returns the report dict (also written to out_dir/eval.json).
    """
    mesh = parallel.make_mesh(-1, 1)
    processes = jax.process_count()
    if settings.batch_size % mesh.size:
        raise ValueError(f"batch size {settings.batch_size} must be a multiple of the {mesh.size} devices")
    local_batch = settings.batch_size // processes
    lpips_graph, lpips_vars = _split(lpips)
    inception_graph, inception_vars = _split(inception)
    replicate = lambda tree: jax.device_put(tree, parallel.replicated(mesh))  # noqa: E731
    step = jax.jit(
        _batch_function(codec, settings, lpips_graph, inception_graph),
        out_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
    )
    params, lpips_vars, inception_vars = replicate(codec.params), replicate(lpips_vars), replicate(inception_vars)

    batches = data.eval_batches(
        cfg, size=settings.size, batch_size=local_batch, process_index=jax.process_index(),
        process_count=processes, limit=settings.num_images,
    )
    totals: dict[str, float] = {}
    real, fake = metrics.FeatureStats(2048), metrics.FeatureStats(2048)
    saved = 0
    key = jax.random.key(settings.seed)
    bar = tqdm(total=len(batches), unit="batch", disable=not (progress and jax.process_index() == 0), dynamic_ncols=True)
    with batches:
        for index, (images, count) in enumerate(batches):
            mask = (np.arange(local_batch) < count).astype(np.float32)
            sums, x_hat = step(
                params, lpips_vars, inception_vars, parallel.global_batch(images, mesh),
                parallel.global_batch(mask, mesh), jax.random.fold_in(key, index),
            )
            sums = jax.device_get(sums)
            for name in ("psnr", "ssim", "lpips", "count"):
                if name in sums:
                    totals[name] = totals.get(name, 0.0) + float(sums[name])
            if inception is not None:
                real.add(sums["count"], sums["real_total"], sums["real_outer"])
                fake.add(sums["count"], sums["fake_total"], sums["fake_outer"])
            if out_dir is not None and saved < settings.save_reconstructions and jax.process_index() == 0:
                local = np.asarray(x_hat.addressable_data(0)) if processes > 1 else np.asarray(x_hat)
                take = min(count, settings.save_reconstructions - saved, local.shape[0])
                for i in range(take):
                    viz.save_png(out_dir / "reconstructions" / f"{saved + i:05d}.png", viz.reconstruction_grid([images[i : i + 1], local[i : i + 1]]))
                saved += take
            bar.update(1)
            bar.set_postfix(images=int(totals["count"]), psnr=f"{totals['psnr'] / max(totals['count'], 1):.2f}")
    bar.close()
    count = int(round(totals["count"]))
    if count == 0:
        raise ValueError("no readable image in the evaluation data")
    report: dict[str, Any] = {
        "images": count,
        "psnr": totals["psnr"] / count,
        "ssim": totals["ssim"] / count,
        "lpips": totals["lpips"] / count if "lpips" in totals else None,
        "rfid": None,
        "settings": dataclasses.asdict(settings),
        "data": cfg.data.model_dump(mode="json") if cfg.data else None,
        "skipped_images": batches.skipped(),
    }
    if inception is not None:
        mu_real, sigma_real = _reference(real, reference_stats, settings)
        mu_fake, sigma_fake = fake.mean_cov()
        report["rfid"] = metrics.frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _reference(real: metrics.FeatureStats, path: pathlib.Path | None, settings: EvalSettings):
    """The originals' statistics: from `path` if it exists (checked to match), else computed
    here and cached to `path`."""
    if path is not None and pathlib.Path(path).exists():
        cached = np.load(path)
        if int(cached["count"]) != real.count:
            raise ValueError(
                f"reference statistics {path} are over {int(cached['count'])} images, this evaluation "
                f"has {real.count}; delete the file or pass a matching --num-images"
            )
        return cached["mu"], cached["sigma"]
    mu, sigma = real.mean_cov()
    if path is not None and jax.process_index() == 0:
        np.savez(path, mu=mu, sigma=sigma, count=real.count, size=settings.size, rounding=settings.fid_rounding)
    return mu, sigma


def markdown_row(name: str, report: dict[str, Any]) -> str:
    """A row of the reference table: | model | rFID | PSNR | SSIM | LPIPS |."""
    show = lambda value, digits: "n/a" if value is None else f"{value:.{digits}f}"  # noqa: E731
    return f"| {name} | {show(report['rfid'], 3)} | {show(report['psnr'], 3)} | {show(report['ssim'], 3)} | {show(report['lpips'], 3)} |"


def _mesh_and_local_batch(settings: EvalSettings):
    """The (data, fsdp) mesh over every device, and this process's share of the batch."""
    mesh = parallel.make_mesh(-1, 1)
    if settings.batch_size % mesh.size:
        raise ValueError(f"batch size {settings.batch_size} must be a multiple of the {mesh.size} devices")
    return mesh, settings.batch_size // jax.process_count()


def _eval_batches(cfg: Config, settings: EvalSettings, local_batch: int) -> data.EvalIterator:
    return data.eval_batches(cfg, size=settings.size, batch_size=local_batch, process_index=jax.process_index(),
                             process_count=jax.process_count(), limit=settings.num_images)


def latent_statistics(codec: Codec, cfg: Config, settings: EvalSettings, *, progress: bool = True) -> dict[str, Any]:
    """Per-channel and global mean/std of the latents (the posterior mode, or a sample with
    settings.sample_posterior) over cfg.data, and the factors a diffusion model would use:
    shift_factor = global mean, scaling_factor = 1 / global std (so (z - shift) * scale has
    zero mean and unit variance)."""
    mesh, local_batch = _mesh_and_local_batch(settings)

    @jax.jit
    def sums(params, images, mask, key):
        model = nnx.merge(codec.graphdef, params)
        posterior = model.posterior(images)
        z = (posterior.sample(key) if settings.sample_posterior else posterior.mode()).astype(jnp.float32)
        z = jnp.where(mask[:, None, None, None] > 0, z, 0.0)
        positions = jnp.sum(mask) * z.shape[1] * z.shape[2]
        return positions, jnp.sum(z, axis=(0, 1, 2)), jnp.sum(z * z, axis=(0, 1, 2))

    params = jax.device_put(codec.params, parallel.replicated(mesh))
    batches = _eval_batches(cfg, settings, local_batch)
    count, total, squares = 0.0, 0.0, 0.0
    key = jax.random.key(settings.seed)
    with batches:
        for index, (images, n) in enumerate(tqdm(batches, unit="batch", disable=not (progress and jax.process_index() == 0))):
            mask = (np.arange(local_batch) < n).astype(np.float32)
            c, s, q = jax.device_get(sums(params, parallel.global_batch(images, mesh), parallel.global_batch(mask, mesh), jax.random.fold_in(key, index)))
            count, total, squares = count + float(c), total + np.asarray(s, np.float64), squares + np.asarray(q, np.float64)
    if count == 0:
        raise ValueError("no readable image in the data")
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


def robustness(
    codec: Codec, cfg: Config, settings: EvalSettings, *, sigmas=ROBUSTNESS_SIGMAS, lpips=None, progress: bool = True
) -> list[dict[str, float]]:
    """How gracefully the decoder degrades under latent noise: decode z + sigma * std(z) * eps
    (z the posterior mode, std(z) the standard deviation of each image's latent, eps ~ N(0, I))
    for every sigma, and average PSNR (and LPIPS) of the decodings against the originals.
    Returns [{"sigma", "psnr", "lpips"}] in the order of `sigmas`."""
    mesh, local_batch = _mesh_and_local_batch(settings)
    lpips_graph, lpips_vars = _split(lpips)

    @jax.jit
    def sums(params, lpips_vars, images, mask, sigma, key):
        model = nnx.merge(codec.graphdef, params)
        z = model.encode(images)  # (B, h, w, c)
        scale = jnp.std(z, axis=(1, 2, 3), keepdims=True)
        x_hat = model.decode(z + sigma * scale * jax.random.normal(key, z.shape, z.dtype))
        real = mask > 0
        out = {"psnr": jnp.sum(jnp.where(real, metrics.psnr(metrics.to_unit_range(images), metrics.to_unit_range(x_hat)), 0.0))}
        if lpips_graph is not None:
            out["lpips"] = jnp.sum(jnp.where(real, nnx.merge(lpips_graph, lpips_vars)(images, x_hat), 0.0))
        return out

    params = jax.device_put(codec.params, parallel.replicated(mesh))
    lpips_vars = jax.device_put(lpips_vars, parallel.replicated(mesh))
    batches = _eval_batches(cfg, settings, local_batch)
    totals = [{"psnr": 0.0, "lpips": 0.0} for _ in sigmas]
    count = 0
    key = jax.random.key(settings.seed)
    with batches:
        for index, (images, n) in enumerate(tqdm(batches, unit="batch", disable=not (progress and jax.process_index() == 0))):
            mask = (np.arange(local_batch) < n).astype(np.float32)
            images_global, mask_global = parallel.global_batch(images, mesh), parallel.global_batch(mask, mesh)
            count += int(round(float(jnp.sum(mask_global))))
            for i, sigma in enumerate(sigmas):
                batch_sums = jax.device_get(sums(params, lpips_vars, images_global, mask_global, jnp.float32(sigma), jax.random.fold_in(key, index)))
                for name, value in batch_sums.items():
                    totals[i][name] += float(value)
    if count == 0:
        raise ValueError("no readable image in the data")
    return [
        {"sigma": float(sigma), "psnr": t["psnr"] / count, "lpips": t["lpips"] / count if lpips is not None else None}
        for sigma, t in zip(sigmas, totals)
    ]


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order they were given."""
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def latent_figure_data(
    codec: Codec, cfg: Config, settings: EvalSettings, *, num_shown: int = 4, max_values: int = 100_000, progress: bool = True
) -> dict[str, Any]:
    """What the latent figures need from one model over cfg.data (the latent is the posterior
    mode, or a sample with settings.sample_posterior, unscaled):

    "images", "reconstructions" (num_shown, H, W, 3) and "latents" (num_shown, h, w, C) of the
    first num_shown images, for `viz.latent_pca_figure`; "values" (<= max_values, C): latent
    positions drawn uniformly without replacement over all images (all of them when there are
    no more than max_values; reservoir sampling, settings.seed), for `viz.latent_histogram_figure`;
    "positions": how many latent positions were seen. With several processes each one samples
    its own images."""
    if num_shown < 1 or max_values < 1:
        raise ValueError(f"num_shown={num_shown} and max_values={max_values} must both be at least 1")
    mesh, local_batch = _mesh_and_local_batch(settings)

    @jax.jit
    def encode(params, images, key):
        posterior = nnx.merge(codec.graphdef, params).posterior(images)
        return posterior.sample(key) if settings.sample_posterior else posterior.mode()

    params = jax.device_put(codec.params, parallel.replicated(mesh))
    rng = np.random.default_rng(settings.seed)
    shown: dict[str, list[np.ndarray]] = {"images": [], "reconstructions": [], "latents": []}
    reservoir, seen = None, 0
    key = jax.random.key(settings.seed)
    batches = _eval_batches(cfg, settings, local_batch)
    with batches:
        for index, (images, n) in enumerate(tqdm(batches, unit="batch", disable=not (progress and jax.process_index() == 0))):
            z = _local_rows(encode(params, parallel.global_batch(images, mesh), jax.random.fold_in(key, index)))[:n]
            have = sum(len(a) for a in shown["images"])
            if have < num_shown:
                take = min(num_shown - have, n)
                shown["images"].append(images[:take])
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
        raise ValueError("no readable image in the data")
    figure_data = {name: np.concatenate(parts) for name, parts in shown.items()}
    figure_data["values"] = reservoir[: min(seen, max_values)]
    figure_data["positions"] = seen
    return figure_data
