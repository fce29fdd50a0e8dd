"""train.py with its workdir, data and `--init` on Cloud Storage: fake-gcs-server on localhost
(the `gcs` fixture of conftest.py), reached through the standard endpoint variables only. Exact
resume after kill -9, and the one-line error for a missing bucket. Two processes writing one
checkpoint to a bucket, preempted and resumed, are in test_train_loop.py (beside the
uninterrupted 2-process run they are compared with)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
from test_train_loop import (
    REPO,
    command,
    committed_steps,
    environment,
    exported_params,
    jax_leaves,
    run,
)

import sigmavae_jax
from sigmavae_jax import api, checkpoint, storage
from sigmavae_jax.config import Config, load_config


def gcs_environment(gcs) -> dict[str, str]:
    return {**environment(), **gcs.environment()}


def upload(local, bucket: str, prefix: str) -> str:
    """Copies the files of a local folder to gs://bucket/prefix/; returns that URL."""
    from etils import epath

    for file in sorted(local.iterdir()):
        (epath.Path(f"gs://{bucket}/{prefix}") / file.name).write_bytes(file.read_bytes())
    return f"gs://{bucket}/{prefix}"


def test_kill_9_with_workdir_data_and_init_on_gs_then_rerun_ends_like_a_local_run(gcs, photos, tmp_path):
    bucket = gcs.new_bucket()
    images = upload(photos, bucket, "images")
    model = load_config("tiny").model
    params = api.params_of(api.build_model(model, seed=5))
    checkpoint.save_params(tmp_path / "init", params, Config(model=model))
    checkpoint.save_params(f"gs://{bucket}/init", params, Config(model=model))
    steps = ["train.steps=24", "checkpoint.every=3"]  # the kill comes ~20 steps before the end
    run(command(tmp_path / "local", photos, *steps) + ["--init", str(tmp_path / "init")])

    workdir, env = f"gs://{bucket}/run", gcs_environment(gcs)
    argv = command(workdir, images, *steps) + ["--init", f"gs://{bucket}/init"]
    with open(tmp_path / "killed.err", "w") as err:
        process = subprocess.Popen(argv, env=env, stdout=err, stderr=err, cwd=REPO)
    try:
        deadline = time.time() + 300
        while not committed_steps(gcs, bucket, "run/checkpoints"):
            assert process.poll() is None, (tmp_path / "killed.err").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint was committed to the bucket"
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    committed = committed_steps(gcs, bucket, "run/checkpoints")
    assert committed and max(committed) < 24

    resumed = run(argv, env=env)
    assert f"resumed from {workdir}/checkpoints at step {max(committed)}" in resumed.stderr
    assert f"done at step 24; workdir {workdir}; params export {workdir}/export/step_00000024" in resumed.stdout

    # Bitwise: the same starting params and images (read from the bucket or the local disk),
    # the same compiled step, and the state and data iterator restored from the bucket exactly.
    for ema, suffix in ((False, ""), (True, "_ema")):
        local = exported_params(tmp_path / "local", ema)
        remote = sigmavae_jax.load(f"{workdir}/export/step_00000024{suffix}").params
        for a, b in zip(jax_leaves(local), jax_leaves(remote), strict=True):
            np.testing.assert_array_equal(a, b)

    names = set(gcs.objects(bucket, "run/"))
    assert {"run/config.json", "run/metrics.jsonl", "run/images/reconstructions_00000000.png"} <= names
    assert any(name.startswith("run/tensorboard/events.out.tfevents.") for name in names), sorted(names)
    assert not any(".orbax-checkpoint-tmp" in name for name in names)
    metrics = (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()
    assert metrics[-1].startswith('{"step": 24,')
    assert not (REPO / "gs:").exists()  # what pathlib made of gs:// URLs before


def test_a_missing_bucket_is_a_one_line_error_within_the_timeout(gcs, photos, tmp_path):
    env = {**gcs_environment(gcs), "SIGMAVAE_STORAGE_TIMEOUT_S": "10"}
    start = time.time()
    done = subprocess.run(
        command("gs://no-such-bucket/run", photos), env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 2, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: gs://no-such-bucket/run: "), done.stderr[-4000:]
    assert "gs://no-such-bucket does not exist" in errors[0]
    assert "Traceback" not in done.stderr
    assert time.time() - start < 60  # python and jax start, then one bucket lookup: no retries, no hang
