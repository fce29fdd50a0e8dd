"""Latent figures: the PCA picture recovers a planted 3-d structure with a data-fixed sign,
the histograms are numpy's, the figure data are the codec's latents, and `eval.py --figures`
writes both PNGs with the expected layout."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import photo_folder_with_tiny_export
from PIL import Image

import sigmavae_jax
from sigmavae_jax import data, viz
from sigmavae_jax.evaluate import EvalSettings, latent_figure_data

REPO = pathlib.Path(__file__).resolve().parent.parent
IMAGES, SIZE = 11, 32  # 11 images in batches of 8: a partial last batch


def planted(seed=0, shape=(4, 8, 8), channels=16, noise=0.01):
    """Latents = a known 3-d signal (uniform, whitened, then stds 3 > 2 > 1) embedded by a random orthogonal
    map into `channels` channels, plus an offset and small noise. -> (latents, signal (N, 3), map)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    signal = rng.uniform(-1, 1, (n, 3))
    signal -= signal.mean(0)
    values, vectors = np.linalg.eigh(np.cov(signal, rowvar=False))  # whiten: sample covariance exactly diag(9, 4, 1)
    signal = signal @ vectors @ np.diag(values**-0.5) @ vectors.T * np.array([3.0, 2.0, 1.0])
    k = min(3, channels)
    embedding, _ = np.linalg.qr(rng.normal(size=(channels, k)))  # (C, k), orthonormal columns
    latents = signal[:, :k] @ embedding.T + rng.normal(size=channels) + noise * rng.normal(size=(n, channels))
    return latents.reshape(*shape, channels), signal, embedding


def test_latent_pca_rgb_recovers_the_planted_components():
    latents, signal, _ = planted()
    rgb = viz.latent_pca_rgb(latents)
    assert rgb.shape == (4, 8, 8, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0  # 1st/99th percentiles clip a few positions
    flat = rgb.reshape(-1, 3)
    r = np.corrcoef(flat.T, signal.T)[:3, 3:]  # r[i, j]: output channel i vs planted component j
    assert np.all(np.abs(np.diag(r)) > 0.99), r
    assert np.all(np.abs(r[~np.eye(3, dtype=bool)]) < 0.1), r  # in order of variance, not mixed


def test_latent_pca_sign_is_fixed_by_the_data(monkeypatch):
    latents, _, _ = planted(seed=1)
    rgb = viz.latent_pca_rgb(latents)
    _, components, variances = viz.latent_pca_basis(latents)
    assert np.all(np.diff(variances) < 0)
    largest = components[np.argmax(np.abs(components), axis=0), range(3)]
    assert np.all(largest > 0)
    # negating the embedding negates every projection: the colours invert, nothing else
    np.testing.assert_allclose(viz.latent_pca_rgb(-latents), 1.0 - rgb, atol=1e-5)
    # reordering channels moves the loadings, not their signs
    np.testing.assert_allclose(viz.latent_pca_rgb(latents[..., ::-1]), rgb, atol=1e-5)
    # whatever sign the eigensolver returns
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: (eigh(a)[0], -eigh(a)[1]))
    np.testing.assert_allclose(viz.latent_pca_rgb(latents), rgb, atol=1e-6)


def test_latent_pca_with_fewer_than_three_channels():
    latents, signal, _ = planted(channels=2)
    rgb = viz.latent_pca_rgb(latents)
    assert rgb.shape == (4, 8, 8, 3) and np.all(rgb[..., 2] == 0.5)
    assert abs(np.corrcoef(rgb[..., 0].ravel(), signal[:, 0])[0, 1]) > 0.9


def test_latent_histograms_are_numpy_histograms():
    rng = np.random.default_rng(0)
    samples = {"a": rng.normal(0.5, 2.0, (3000, 4)), "b": rng.normal(size=(2000, 2))}
    hists = viz.latent_histograms(samples, bins=30)
    assert len(hists) == 4
    for c, hist in enumerate(hists):
        edges = hist["edges"]
        assert edges.shape == (31,) and edges[0] <= -4 and edges[-1] >= 4
        assert set(hist["density"]) == ({"a", "b"} if c < 2 else {"a"})
        for name, density in hist["density"].items():
            values = samples[name][:, c]
            np.testing.assert_allclose(density, np.histogram(values, bins=edges, density=True)[0])
            assert hist["mean"][name] == pytest.approx(values.mean()) and hist["std"][name] == pytest.approx(
                values.std()
            )
    assert hists[0]["mean"]["a"] == pytest.approx(0.5, abs=0.1) and hists[0]["std"]["a"] == pytest.approx(2.0, abs=0.1)


def test_latent_pca_figure_layout_and_content():
    rng = np.random.default_rng(0)
    item = {
        "images": rng.uniform(-1, 1, (2, 16, 16, 3)),
        "reconstructions": rng.uniform(-1, 1, (2, 16, 16, 3)),
        "latents": rng.normal(size=(2, 4, 4, 5)),
    }
    one, two = viz.latent_pca_figure({"a": item}, gap=2, label_height=18), viz.latent_pca_figure({"a": item, "b": item})
    assert one.shape == (18 + 18 + 2 * 18, 3 * 16 + 2 * 2, 3)  # header, label, 2 rows of 16 + gap
    assert two.shape == (18 + 2 * (18 + 2 * 18), 52, 3)
    top = 18 + 18  # first image row of the first group
    assert np.array_equal(one[top : top + 16, :16], viz.to_uint8(item["images"][0]))
    assert np.array_equal(one[top + 18 : top + 34, 18:34], viz.to_uint8(item["reconstructions"][1]))
    pca = viz.to_uint8(viz.latent_pca_rgb(item["latents"])[0].repeat(4, 0).repeat(4, 1) * 2 - 1)
    assert np.array_equal(one[top : top + 16, 36:52], pca)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    return (root, *photo_folder_with_tiny_export(root, IMAGES))


def test_latent_figure_data_are_the_codec_latents(setup):
    root, export, cfg = setup
    codec = sigmavae_jax.load(export)
    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=4)])
    z = np.asarray(codec.encode(images))  # (11, 8, 8, 4)
    rows = z.reshape(-1, z.shape[-1])
    settings = EvalSettings(batch_size=8, size=SIZE)
    everything = latent_figure_data(codec, cfg, settings, num_shown=10, max_values=10_000, progress=False)
    assert everything["positions"] == len(rows)
    np.testing.assert_allclose(everything["images"], images[:10])
    np.testing.assert_allclose(everything["latents"], z[:10], atol=1e-5)
    np.testing.assert_allclose(everything["reconstructions"], np.asarray(codec.reconstruct(images[:10])), atol=1e-4)
    np.testing.assert_allclose(np.sort(everything["values"], 0), np.sort(rows, 0), atol=1e-5)  # all of them
    sample = latent_figure_data(codec, cfg, settings, num_shown=1, max_values=100, progress=False)
    assert sample["values"].shape == (100, 4) and sample["images"].shape == (1, SIZE, SIZE, 3)
    distance = np.abs(sample["values"][:, None, :] - rows[None]).max(-1)  # (100, 704)
    picked = distance.argmin(1)
    assert np.all(distance.min(1) < 1e-5) and len(set(picked)) == 100  # latent rows, without replacement
    assert picked.max() >= 8 * 8 * 8  # reaches past the first batch
    again = latent_figure_data(codec, cfg, settings, num_shown=1, max_values=100, progress=False)
    np.testing.assert_array_equal(again["values"], sample["values"])  # seeded


def test_eval_cli_writes_both_figures(setup, tmp_path):
    root, export, _ = setup
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            "--checkpoint",
            str(export),
            "--compare",
            str(export),
            "--figures",
            "--figure-images",
            "2",
            "--size",
            str(SIZE),
            "--batch-size",
            "4",
            "--num-images",
            "6",
            "--out",
            str(tmp_path),
            "--name",
            "a",
            f"data.path={root}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"latent PCA: {tmp_path / 'latent_pca.png'}" in done.stdout
    assert "a: 384 latent positions" in done.stdout and "export: 384 latent positions" in done.stdout
    with Image.open(tmp_path / "latent_pca.png") as pca:  # header + 2 models x (label + 2 rows of 32 + gap)
        assert pca.format == "PNG" and pca.size == (3 * SIZE + 4, 18 + 2 * (18 + 2 * (SIZE + 2)))
    with Image.open(tmp_path / "latent_histograms.png") as hist:  # 4 channels: 2 x 2 panels of 3.2 x 2.6 in at 80 dpi
        assert hist.format == "PNG" and hist.size == (512, 416)
