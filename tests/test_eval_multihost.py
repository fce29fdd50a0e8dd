"""eval.py across processes and on Cloud Storage: two processes on localhost (--coordinator)
report the figures one process reports, with a last batch that is partly padding on both, and
only process 0 writes; their merged latent statistics are those of all images; a training
workdir on gs:// is evaluated into the bucket.

rFID: the real FID Inception takes minutes to compile and run on these CPUs, so the eval
processes run eval.py with `load_inception` replaced by `ToyInception`, a cheap (B, 2048)
feature map whose statistics go through exactly the code real features go through. Only 4 of
its 2048 features vary (the rest are 0): with 7 images, 2048 varying features would make the
covariances singular, and the Frechet distance of singular covariances changes by ~1e-6 under
float64 rounding alone, which would hide a real difference behind noise.

This file is also the eval processes' program: `python tests/test_eval_multihost.py ARGS` is
`python eval.py ARGS` with that stand-in.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parent.parent
IMAGES, SIZE, BATCH = 7, 32, 4  # 7 readable images in global batches of 4: the last one is partly padding
FIGURES = ("psnr", "ssim", "lpips", "rfid")


class ToyInception(nnx.Module):
    """(B, H, W, 3) in [0, 1] -> (B, 2048): 4 features of a 4 x 4 thumbnail, then 2044 zeros."""

    def __init__(self):
        self.projection = nnx.Param(jax.random.normal(jax.random.key(0), (48, 4)) / 3.0)

    def __call__(self, x01):
        thumbnail = jax.image.resize(x01, (x01.shape[0], 4, 4, 3), "linear").reshape(x01.shape[0], -1)
        return jnp.pad(jnp.tanh(thumbnail @ self.projection[...]), ((0, 0), (0, 2048 - 4)))


if __name__ == "__main__":  # an eval process of these tests (see the module docstring)
    import sigmavae_jax.models.inception as inception_module
    from sigmavae_jax.cli import eval as eval_cli

    def load_toy(path, **_):
        assert path == "toy", path  # what the tests pass as --inception
        return ToyInception()

    inception_module.load_inception = load_toy
    sys.exit(eval_cli.main())

import pytest  # noqa: E402  (the eval processes above need neither pytest nor the fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
    """A persistent compilation cache that the eval processes share: the Cloud Storage run
    compiles what the single-process run compiled before it."""
    return tmp_path_factory.mktemp("compilation_cache")


def launch(args, *, cwd, devices, cache, extra_env=None) -> subprocess.Popen:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        **(extra_env or {}),
    }
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).resolve()), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    """Waits for an eval process; its stdout, after checking that it succeeded."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-4000:]
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of 7 photos and one unreadable file, and a tiny model's params export."""
    from conftest import photo_folder_with_tiny_export

    root = tmp_path_factory.mktemp("photos")
    export, _ = photo_folder_with_tiny_export(root, IMAGES)
    (root / "00b.png").write_bytes(b"not an image")  # second in sorted order: in process 1's share
    return root, export


def eval_args(root, checkpoint, *extra) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--size",
        str(SIZE),
        "--batch-size",
        str(BATCH),
        "--inception",
        "toy",
        "--save-reconstructions",
        "3",
        "--name",
        "tiny",
        *extra,
        f"data.path={root}",
    ]


class Runs:
    """Eval processes started side by side: `output(name)` waits for one (once), checks that it
    succeeded and returns its stdout; `folder(name)` is its working directory."""

    def __init__(self, cache: pathlib.Path):
        self.cache = cache
        self.started: dict[str, tuple[pathlib.Path, subprocess.Popen]] = {}
        self._outputs: dict[str, str] = {}

    def start(self, name, args, *, cwd, devices) -> None:
        self.started[name] = (cwd, launch(args, cwd=cwd, devices=devices, cache=self.cache))

    def folder(self, name) -> pathlib.Path:
        return self.started[name][0]

    def output(self, name) -> str:
        if name not in self._outputs:
            self._outputs[name] = finish(self.started[name][1])
        return self._outputs[name]

    def stop(self) -> None:
        for _, process in self.started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def runs(inputs, compilation_cache, tmp_path_factory):
    """The same evaluation by one process with 2 devices ("one") and by two processes with 1
    device each ("p0", "p1"), started side by side, each in its own working directory, with a
    relative --out and --reference-stats.

    Both meshes have 2 devices with 2 rows of each global batch of 4: the model then computes
    each image with the same per-device shapes in both runs, so their per-image values agree to
    the bit, and any difference in the figures comes from how they are merged."""
    root, export = inputs
    base = tmp_path_factory.mktemp("runs")
    args = eval_args(root, export, "--out", "out", "--reference-stats", "reference.npz")
    port = free_port()
    runs = Runs(compilation_cache)
    runs.start("one", args, cwd=base / "one", devices=2)
    for i in range(2):
        runs.start(
            f"p{i}",
            args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=base / f"p{i}",
            devices=1,
        )
    yield runs
    runs.stop()


def read_report(folder) -> dict:
    return json.loads((folder / "eval.json").read_text())


def assert_same_figures(got: dict, want: dict) -> None:
    assert got["images"] == want["images"] == IMAGES
    assert got["skipped_images"] == want["skipped_images"]
    for name in FIGURES:
        assert isinstance(got[name], float) and got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-6), name


def test_two_processes_report_what_one_process_reports(runs):
    one_out, p0_out, p1_out = runs.output("one"), runs.output("p0"), runs.output("p1")
    one_dir, p0_dir, p1_dir = runs.folder("one"), runs.folder("p0"), runs.folder("p1")
    reference = read_report(one_dir / "out")
    assert_same_figures(read_report(p0_dir / "out"), reference)
    assert reference["skipped_images"]["skipped"] == 1 and reference["skipped_images"]["files"][0].endswith("00b.png")
    assert reference["rfid"] > 0.01  # the toy features tell originals from reconstructions
    # only process 0 writes (each process resolved the relative paths in its own directory) and prints
    assert sorted(p.name for p in (p0_dir / "out" / "reconstructions").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    assert (
        (p0_dir / "reference.npz").exists()
        and not (p1_dir / "out").exists()
        and not (p1_dir / "reference.npz").exists()
    )
    assert "| tiny | " in one_out and "| tiny | " in p0_out and "| tiny | " not in p1_out
    # the cached statistics of the originals are over all 7 of them, however they were split
    cached = [np.load(folder / "reference.npz") for folder in (one_dir, p0_dir)]
    assert int(cached[0]["count"]) == int(cached[1]["count"]) == IMAGES
    np.testing.assert_allclose(cached[1]["mu"], cached[0]["mu"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cached[1]["sigma"], cached[0]["sigma"], rtol=1e-10, atol=1e-13)


def test_two_processes_merge_the_latent_statistics(inputs, compilation_cache, tmp_path):
    """--mode latent-stats on two processes: the float64 sums of both shares, merged, equal numpy's
    statistics of every image's latent; only process 0 writes."""
    import sigmavae_jax
    from sigmavae_jax import data
    from sigmavae_jax.config import load_config

    root, export = inputs
    args = [
        "--checkpoint",
        str(export),
        "--mode",
        "latent-stats",
        "--size",
        str(SIZE),
        "--batch-size",
        str(BATCH),
        "--out",
        "out",
        f"data.path={root}",
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--num-processes",
        "2",
    ]
    processes = [
        launch(args + ["--process-id", str(i)], cwd=tmp_path / f"p{i}", devices=1, cache=compilation_cache)
        for i in range(2)
    ]
    for process in processes:
        finish(process)
    stats = json.loads((tmp_path / "p0" / "out" / "latent_stats.json").read_text())
    assert not (tmp_path / "p1" / "out").exists()
    cfg = load_config(None, [f"data.path={root}"])
    images = np.concatenate([batch[:n] for batch, n in data.eval_batches(cfg, size=SIZE, batch_size=BATCH)])
    z = np.asarray(sigmavae_jax.load(export).encode(images), np.float64)  # (7, 8, 8, 4)
    assert stats["positions"] == z.shape[0] * z.shape[1] * z.shape[2] and len(images) == IMAGES
    np.testing.assert_allclose(stats["channel_mean"], z.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["channel_std"], z.std(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["shift_factor"], z.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["scaling_factor"], 1 / z.std(), rtol=1e-5)


def upload_folder(local: pathlib.Path, remote) -> None:
    for file in sorted(local.rglob("*")):
        if file.is_file():
            (remote / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())


def test_a_workdir_on_cloud_storage_is_evaluated_into_the_bucket(gcs, inputs, runs, compilation_cache, tmp_path):
    from etils import epath

    root, export = inputs
    bucket = gcs.new_bucket()
    upload_folder(export, epath.Path(f"gs://{bucket}/run/export/step_00000004"))
    done = finish(
        launch(
            eval_args(root, f"gs://{bucket}/run", "--reference-stats", f"gs://{bucket}/reference.npz"),
            cwd=tmp_path,
            devices=2,
            cache=compilation_cache,
            extra_env=gcs.environment(),
        )
    )
    report_in = "run/export/step_00000004/eval/"  # the default --out: next to the workdir's latest export
    assert f"report in gs://{bucket}/{report_in}eval.json" in done
    assert set(gcs.objects(bucket, report_in)) == {
        f"{report_in}eval.json",
        *(f"{report_in}reconstructions/{i:05d}.png" for i in range(3)),
    }
    remote = json.loads(epath.Path(f"gs://{bucket}/{report_in}eval.json").read_text())
    runs.output("one")
    assert_same_figures(remote, read_report(runs.folder("one") / "out"))
    cached = np.load(io.BytesIO(epath.Path(f"gs://{bucket}/reference.npz").read_bytes()))
    assert int(cached["count"]) == IMAGES
    assert list(tmp_path.iterdir()) == []  # nothing written locally


def test_cloud_storage_errors_are_one_line(gcs, inputs, tmp_path):
    root, _ = inputs
    done = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", "gs://no-such-bucket-here/run", f"data.path={root}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, **gcs.environment(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(
        "error: gs://no-such-bucket-here/run: the bucket gs://no-such-bucket-here does not exist"
    )
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["local", "gs"])
def test_reference_statistics_are_cached_at_the_given_path(where, tmp_path, request):
    from sigmavae_jax import evaluate, metrics, storage

    if where == "gs":
        path = f"gs://{request.getfixturevalue('gcs').new_bucket()}/stats/reference"
    else:
        path = tmp_path / "reference"  # no .npz suffix: the cache is still that very file
    features = np.random.default_rng(0).normal(size=(9, 2048))
    settings = evaluate.EvalSettings(size=SIZE)

    def reference(stats):  # as evaluate does: the file read and checked first, then used or written
        where = storage.reachable(path)
        return evaluate._reference(stats, evaluate.read_reference(where, settings), where, settings)

    mu, sigma = reference(metrics.FeatureStats(2048).update(features))
    assert storage.path(path).exists()
    # read back, not computed again: other features over as many images give the cached statistics
    cached_mu, cached_sigma = reference(metrics.FeatureStats(2048).update(features + 1.0))
    np.testing.assert_array_equal(cached_mu, mu)
    np.testing.assert_array_equal(cached_sigma, sigma)
    with pytest.raises(ValueError, match=r"over 9 images, this evaluation has 8; delete the file"):
        reference(metrics.FeatureStats(2048).update(features[:8]))
