"""The evaluation loop: metrics merged over 8 devices and a partial last batch equal
per-image references (skimage PSNR/SSIM, LPIPS, the Frechet distance of the features); the
robustness sweep equals a decoding per sigma and encodes each batch once; eval.py's --mode and
the flags it replaced choose the same mode, and contradictory ones are an error."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import photo_folder_with_tiny_export
from flax import nnx
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import sigmavae_jax
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
    np.testing.assert_allclose(
        report["psnr"], np.mean([peak_signal_noise_ratio(x, y, data_range=1) for x, y in zip(a, b)]), atol=1e-4
    )
    np.testing.assert_allclose(
        report["ssim"],
        np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1) for x, y in zip(a, b)]),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        report["lpips"], float(jnp.mean(lpips(jnp.asarray(images), jnp.asarray(recon)))), rtol=1e-4
    )

    toy = ToyFeatures()
    quantize = lambda x: np.floor(np.clip(x, 0, 1) * 255 + 1e-3) / 255  # noqa: E731
    real, fake = (
        np.asarray(toy(jnp.asarray(quantize(a), jnp.float32))),
        np.asarray(toy(jnp.asarray(quantize(b), jnp.float32))),
    )
    want = metrics.frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    np.testing.assert_allclose(report["rfid"], want, rtol=1e-4)
    assert (root / "out" / "eval.json").exists()
    assert markdown_row("tiny", report).startswith("| tiny | ")


def test_reference_statistics_are_cached_and_checked(setup, tmp_path):
    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    stats = tmp_path / "reference.npz"

    def run(**settings):
        return evaluate(
            codec,
            cfg,
            EvalSettings(batch_size=8, size=SIZE, **settings),
            inception=ToyFeatures(),
            reference_stats=stats,
            progress=False,
        )

    first = run()
    assert stats.exists()
    again = run()
    assert again["rfid"] == pytest.approx(first["rfid"], rel=1e-9)
    with pytest.raises(ValueError, match="over 11 images"):
        run(num_images=5)
    # made at another --size or --fid-rounding: refused, not silently compared
    with pytest.raises(ValueError, match=f"made with --size {SIZE}, --fid-rounding truncate"):
        run(fid_rounding="round")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: path.mkdir(), "is a folder, not an .npz file"),
        (lambda path: path.write_bytes(b"not an npz"), "are not a readable .npz"),
        (lambda path: np.savez(path, mu=np.zeros(3)), "have no sigma, count, size, rounding: not written by eval.py"),
    ],
)
def test_unusable_reference_statistics_are_refused_before_any_image_is_read(
    setup, tmp_path, monkeypatch, make, message
):
    root, export, cfg = setup
    stats = tmp_path / "reference.npz"
    make(stats)
    monkeypatch.setattr(data, "eval_batches", lambda *a, **k: pytest.fail("images read before the check"))
    with pytest.raises(ValueError, match=message):
        evaluate(
            sigmavae_jax.load(export),
            cfg,
            EvalSettings(batch_size=8, size=SIZE, save_reconstructions=2),
            inception=ToyFeatures(),
            reference_stats=stats,
            out_dir=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_eval_cli_prints_a_table_row(setup, tmp_path):
    root, export, _ = setup
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            "--checkpoint",
            str(export),
            "--size",
            "32",
            "--batch-size",
            "4",
            "--num-images",
            "6",
            "--out",
            str(tmp_path),
            "--name",
            "tiny",
            "--save-reconstructions",
            "2",
            f"data.path={root}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | n/a |" in done.stdout and (tmp_path / "eval.json").exists()
    assert len(list((tmp_path / "reconstructions").glob("*.png"))) == 2
    bad = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(tmp_path / "nope"), "data.path=x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
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


ROBUSTNESS_SIGMAS = (0.0, 1.0, 4.0)


@pytest.fixture(scope="module")
def robustness_rows(setup):
    from sigmavae_jax.evaluate import robustness

    root, export, cfg = setup
    settings = EvalSettings(batch_size=8, size=SIZE)
    return robustness(
        sigmavae_jax.load(export), cfg, settings, sigmas=ROBUSTNESS_SIGMAS, lpips=load_lpips(None), progress=False
    )


def test_robustness_sweep_degrades_with_noise_and_draws_a_curve(setup, robustness_rows, tmp_path):
    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    rows = robustness_rows
    assert [r["sigma"] for r in rows] == [0.0, 1.0, 4.0]
    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=4)])
    clean = metrics.psnr(metrics.to_unit_range(images), metrics.to_unit_range(np.asarray(codec.reconstruct(images))))
    np.testing.assert_allclose(rows[0]["psnr"], float(np.mean(clean)), atol=1e-4)  # sigma 0: the plain reconstruction
    # noise reaches the decoder (an untrained model need not degrade monotonically)
    assert abs(rows[2]["psnr"] - rows[0]["psnr"]) > 1e-3 and abs(rows[2]["lpips"] - rows[0]["lpips"]) > 1e-4
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    common = [
        "--sigmas",
        "0,0.5",
        "--size",
        "32",
        "--batch-size",
        "4",
        "--num-images",
        "4",
        "--name",
        "a",
        f"data.path={root}",
    ]
    # --mode robustness, and the flag it replaced, side by side (the second without --compare)
    runs = {
        out: subprocess.Popen(
            [
                sys.executable,
                str(REPO / "eval.py"),
                "--checkpoint",
                str(export),
                *chosen,
                "--out",
                str(tmp_path / out),
                *common,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for out, chosen in (("mode", ["--compare", str(export), "--mode", "robustness"]), ("flag", ["--robustness"]))
    }
    done = {out: (process.communicate(timeout=300), process.returncode) for out, process in runs.items()}
    for (_, stderr), returncode in done.values():
        assert returncode == 0, stderr[-3000:]
    stdout = done["mode"][0][0]
    assert "| a | " in stdout and "| export | " in stdout
    assert (tmp_path / "mode" / "robustness.png").stat().st_size > 1000
    reports = {name: json.loads((tmp_path / name / "robustness.json").read_text()) for name in runs}
    assert list(reports["flag"]) == ["a"] and reports["flag"]["a"] == reports["mode"]["a"]


def test_robustness_equals_decodings_of_noised_latents_per_sigma(setup, robustness_rows):
    """Each sigma on its own, as the docstring states it: per batch i, eps ~ N(0, I) from
    fold_in(key(seed), i) over the whole (padded) batch, the decoding of z + sigma * std(z) * eps,
    and skimage's PSNR and LPIPS of the real rows."""
    root, export, cfg = setup
    codec, lpips = sigmavae_jax.load(export), load_lpips(None)
    psnr, lpips_values = [[] for _ in ROBUSTNESS_SIGMAS], [[] for _ in ROBUSTNESS_SIGMAS]
    for index, (batch, n) in enumerate(data.eval_batches(cfg, size=SIZE, batch_size=8)):
        z = np.asarray(codec.encode(batch))
        eps = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), index), z.shape, jnp.float32))
        scale = z.std(axis=(1, 2, 3), keepdims=True)
        for j, sigma in enumerate(ROBUSTNESS_SIGMAS):
            x_hat = np.asarray(codec.decode(z + sigma * scale * eps))[:n]
            a, b = (np.clip((x.astype(np.float64) + 1) / 2, 0, 1) for x in (batch[:n], x_hat))
            psnr[j] += [peak_signal_noise_ratio(x, y, data_range=1) for x, y in zip(a, b)]
            lpips_values[j] += np.asarray(lpips(jnp.asarray(batch[:n]), jnp.asarray(x_hat))).tolist()
    assert len(psnr[0]) == IMAGES
    for j, row in enumerate(robustness_rows):
        np.testing.assert_allclose(row["psnr"], np.mean(psnr[j]), rtol=1e-5)
        np.testing.assert_allclose(row["lpips"], np.mean(lpips_values[j]), rtol=1e-4)


def test_robustness_encodes_each_batch_once_for_every_sigma(setup, monkeypatch):
    """The encoder runs once per batch and the decoder once per batch and sigma: counted as they
    run on the devices (a callback inside each), not as they are traced."""
    from sigmavae_jax.evaluate import robustness

    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    model_class = type(nnx.merge(codec.graphdef, codec.params))
    runs = {"encode": 0, "decode": 0}

    def counted(name):
        method = getattr(model_class, name)

        def run_and_count(self, x):
            jax.debug.callback(lambda: runs.__setitem__(name, runs[name] + 1))
            return method(self, x)

        return run_and_count

    for name in runs:
        monkeypatch.setattr(model_class, name, counted(name))
    sigmas = (0.0, 0.5, 1.0)
    rows = robustness(codec, cfg, EvalSettings(batch_size=8, size=SIZE), sigmas=sigmas, progress=False)
    jax.effects_barrier()
    assert len(rows) == 3
    batches = 2  # 11 images in batches of 8
    assert runs["encode"] >= batches and runs["encode"] % batches == 0  # a callback may run on several devices
    assert runs["decode"] == len(sigmas) * runs["encode"]


def test_eval_cli_mode_flags_are_aliases_and_contradictions_are_errors(capsys):
    from sigmavae_jax.cli import eval as eval_cli

    for mode in ("latent-stats", "robustness", "figures"):
        assert eval_cli.parse_args([f"--{mode}"]).mode == eval_cli.parse_args(["--mode", mode]).mode == mode
        assert eval_cli.parse_args(["--mode", mode, f"--{mode}"]).mode == mode  # saying it twice is no contradiction
    assert eval_cli.parse_args([]).mode == "metrics"
    assert eval_cli.parse_args(["--robustness", "--sigmas", "0,0.5"]).sigmas == [0.0, 0.5]
    for argv, named in (
        (["--mode", "figures", "--robustness"], ("--mode figures", "--robustness")),
        (["--latent-stats", "--figures"], ("--latent-stats", "--figures")),
        (["--robustness", "--mode", "metrics"], ("--robustness", "--mode metrics")),
        (["--compare", "y"], ("--compare", "--mode metrics")),
        (["--robustness", "--sigmas", "0,x"], ("--sigmas", "'0,x'")),
        (["--robustness", "--sigmas", "0,-1"], ("--sigmas", ">= 0")),
    ):
        with pytest.raises(SystemExit) as exited:
            eval_cli.main(["--checkpoint", "x", *argv, "data.path=x"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(name in err for name in named), err


def test_feature_sums_in_blocks_equal_one_update(monkeypatch):
    from sigmavae_jax import evaluate

    monkeypatch.setattr(
        evaluate, "_FEATURE_ROWS_PER_UPDATE", 3
    )  # added once 3 or more rows wait: after batches 2 and 4
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
