"""The evaluation loop: metrics merged over 8 devices and a partial last batch equal
per-image references (skimage PSNR/SSIM, LPIPS, the Frechet distance of the features)."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import sigmavae_jax
from conftest import photo_folder_with_tiny_export
from sigmavae_jax import data, metrics
from sigmavae_jax.evaluate import EvalSettings, evaluate, markdown_row
from sigmavae_jax.models.lpips import load_lpips

REPO = pathlib.Path(__file__).resolve().parent.parent
IMAGES, SIZE = 11, 32  # 11 images in batches of 8: the last batch has 3 real rows


class ToyFeatures(nnx.Module):
    """A stand-in for the FID Inception: (B, H, W, 3) in [0, 1] -> (B, 2048) features."""

    def __init__(self):
        self.projection = nnx.Param(jax.random.normal(jax.random.key(0), (3 * 16, 2048)) / 7.0)

    def __call__(self, x01):
        pooled = jax.image.resize(x01, (x01.shape[0], 4, 4, 3), "linear").reshape(x01.shape[0], -1)
        return jnp.tanh(pooled @ self.projection[...])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return (root, *photo_folder_with_tiny_export(root, IMAGES))


def test_metrics_match_per_image_references(setup):
    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    lpips = load_lpips(None)
    settings = EvalSettings(batch_size=8, size=SIZE)
    report = evaluate(codec, cfg, settings, lpips=lpips, inception=ToyFeatures(), out_dir=root / "out", progress=False)

    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=4)])
    recon = np.asarray(codec.reconstruct(images))
    a = np.clip((images + 1) / 2, 0, 1).astype(np.float64)
    b = np.clip((recon + 1) / 2, 0, 1).astype(np.float64)
    assert report["images"] == IMAGES
    np.testing.assert_allclose(report["psnr"], np.mean([peak_signal_noise_ratio(x, y, data_range=1) for x, y in zip(a, b)]), atol=1e-4)
    np.testing.assert_allclose(
        report["ssim"], np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1) for x, y in zip(a, b)]), atol=1e-4
    )
    np.testing.assert_allclose(report["lpips"], float(jnp.mean(lpips(jnp.asarray(images), jnp.asarray(recon)))), rtol=1e-4)

    toy = ToyFeatures()
    quantize = lambda x: np.floor(np.clip(x, 0, 1) * 255 + 1e-3) / 255  # noqa: E731
    real, fake = np.asarray(toy(jnp.asarray(quantize(a), jnp.float32))), np.asarray(toy(jnp.asarray(quantize(b), jnp.float32)))
    want = metrics.frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    np.testing.assert_allclose(report["rfid"], want, rtol=1e-4)
    assert (root / "out" / "eval.json").exists()
    assert markdown_row("tiny", report).startswith("| tiny | ")


def test_reference_statistics_are_cached_and_checked(setup, tmp_path):
    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    stats = tmp_path / "reference.npz"
    first = evaluate(codec, cfg, EvalSettings(batch_size=8, size=SIZE), inception=ToyFeatures(), reference_stats=stats, progress=False)
    assert stats.exists()
    again = evaluate(codec, cfg, EvalSettings(batch_size=8, size=SIZE), inception=ToyFeatures(), reference_stats=stats, progress=False)
    assert again["rfid"] == pytest.approx(first["rfid"], rel=1e-9)
    with pytest.raises(ValueError, match="over 11 images"):
        evaluate(codec, cfg, EvalSettings(batch_size=8, size=SIZE, num_images=5), inception=ToyFeatures(), reference_stats=stats, progress=False)


def test_eval_cli_prints_a_table_row(setup, tmp_path):
    root, export, _ = setup
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(export), "--size", "32", "--batch-size", "4",
         "--num-images", "6", "--out", str(tmp_path), "--name", "tiny", "--save-reconstructions", "2", f"data.path={root}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | n/a |" in done.stdout and (tmp_path / "eval.json").exists()
    assert len(list((tmp_path / "reconstructions").glob("*.png"))) == 2
    bad = subprocess.run([sys.executable, str(REPO / "eval.py"), "--checkpoint", str(tmp_path / "nope"), "data.path=x"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2 and "neither a params export" in bad.stderr


def test_latent_statistics_match_numpy(setup):
    from sigmavae_jax.evaluate import latent_statistics

    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    stats = latent_statistics(codec, cfg, EvalSettings(batch_size=8, size=SIZE), progress=False)
    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=4)])
    z = np.asarray(codec.encode(images), np.float64)  # (11, 8, 8, 4)
    assert stats["positions"] == z.shape[0] * z.shape[1] * z.shape[2]
    np.testing.assert_allclose(stats["channel_mean"], z.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["channel_std"], z.std(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(stats["scaling_factor"], 1 / z.std(), rtol=1e-4)
    np.testing.assert_allclose(stats["shift_factor"], z.mean(), rtol=1e-4, atol=1e-6)


def test_robustness_sweep_degrades_with_noise_and_draws_a_curve(setup, tmp_path):
    from sigmavae_jax.evaluate import robustness

    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    rows = robustness(codec, cfg, EvalSettings(batch_size=8, size=SIZE), sigmas=(0.0, 1.0, 4.0), lpips=load_lpips(None), progress=False)
    assert [r["sigma"] for r in rows] == [0.0, 1.0, 4.0]
    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=4)])
    clean = metrics.psnr(metrics.to_unit_range(images), metrics.to_unit_range(np.asarray(codec.reconstruct(images))))
    np.testing.assert_allclose(rows[0]["psnr"], float(np.mean(clean)), atol=1e-4)  # sigma 0: the plain reconstruction
    # noise reaches the decoder (an untrained model need not degrade monotonically)
    assert abs(rows[2]["psnr"] - rows[0]["psnr"]) > 1e-3 and abs(rows[2]["lpips"] - rows[0]["lpips"]) > 1e-4
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(export), "--compare", str(export), "--robustness",
         "--sigmas", "0,0.5", "--size", "32", "--batch-size", "4", "--num-images", "4", "--out", str(tmp_path),
         "--name", "a", f"data.path={root}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| a | " in done.stdout and "| export | " in done.stdout
    assert (tmp_path / "robustness.png").stat().st_size > 1000 and (tmp_path / "robustness.json").exists()


def test_feature_sums_in_blocks_equal_one_update(monkeypatch):
    from sigmavae_jax import evaluate

    monkeypatch.setattr(evaluate, "_FEATURE_ROWS_PER_UPDATE", 3)  # added once 3 or more rows wait: after batches 2 and 4
    features = np.random.default_rng(0).normal(size=(9, 2048)).astype(np.float32)
    sums = evaluate._FeatureSums()
    for start, stop in ((0, 2), (2, 4), (4, 4), (4, 7), (7, 9)):  # one batch without real rows
        sums.add(features[start:stop])
    assert sums.stats.count == 7  # the last batch's 2 rows wait for the final flush
    stats = sums.flush()
    want = metrics.FeatureStats(2048).update(features)
    assert stats.count == 9
    np.testing.assert_allclose(stats.total, want.total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.outer, want.outer, rtol=1e-12, atol=1e-12)
