"""train.py end to end, in subprocesses: exact resume after kill -9, SIGTERM, bad inputs,
and a 2-process (jax.distributed over localhost, CPU collectives) run that saves and resumes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import sigmavae_jax
from sigmavae_jax.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = [
    "train.batch_size=4", "train.image_size=32", "loss.perceptual_weight=0", "loss.disc_start=3",
    "log.every=1", "log.images_every=1000", "optim.warmup_steps=0", "data.workers=0",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    """Smooth random colour images (plus two broken files) in a folder."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        small = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((48 + 4 * i, 40), Image.BICUBIC).save(root / f"img_{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    good = (root / "img_00.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def environment(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(workdir, photos, *extra) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", "tiny", f"workdir={workdir}", f"data.path={photos}", *BASE, *extra]


def run(cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env or environment(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, process, timeout=300, poll=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()[-4000:]}")
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training process")


def exported_params(workdir: pathlib.Path, ema: bool = False):
    exports = sorted((workdir / "export").glob("step_*_ema" if ema else "step_*[0-9]"))
    return sigmavae_jax.load(exports[-1]).params


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, photos):
    steps = ["train.steps=60", "checkpoint.every=5"]
    run(command(tmp_path / "straight", photos, *steps))

    workdir = tmp_path / "killed"
    kill_after = int(np.random.default_rng().choice([10, 20, 30]))  # a checkpoint is saved at this step
    process = subprocess.Popen(command(workdir, photos, *steps), env=environment(), stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # kill once the checkpoint of step `kill_after` is finalised (an async save still in
        # flight is rightly not resumed from) and training has moved past it
        finished = workdir / "checkpoints" / str(kill_after)
        wait_for(lambda: finished.is_dir() and any(s > kill_after for s in logged_steps(workdir)), process, poll=0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert max(logged_steps(workdir)) < 60
    resumed = run(command(workdir, photos, *steps))
    assert "resumed from" in resumed.stderr

    # Bitwise on CPU: the resumed run restores the state and the data iterator exactly and
    # runs the same compiled program, which XLA's CPU backend executes deterministically.
    for ema in (False, True):
        straight, again = exported_params(tmp_path / "straight", ema), exported_params(workdir, ema)
        for a, b in zip(jax_leaves(straight), jax_leaves(again)):
            np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_sigterm_saves_at_the_current_step_and_exits_zero(tmp_path, photos):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir, photos, "train.steps=1000", "checkpoint.every=500"),
        env=environment(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        wait_for(lambda: len(logged_steps(workdir)) >= 3, process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-4000:]
    assert "preempted at step" in out
    saved = Checkpointer(workdir, None).all_steps()
    assert saved and max(saved) >= 3 and max(saved) >= max(logged_steps(workdir)) - 1
    # the broken files in the folder were skipped and counted, not fatal
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_images"] >= 1


def test_bad_config_values_name_the_key(tmp_path, photos):
    done = subprocess.run(
        command(tmp_path / "bad", photos, "train.batch_sise=4"), env=environment(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "train.batch_sise: unknown key" in done.stderr
    done = subprocess.run(
        command(tmp_path / "bad", photos, "optim.lr=-1"), env=environment(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "optim.lr" in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_save_and_resume(tmp_path, photos):
    workdir = tmp_path / "multi"

    def launch(steps):
        port = free_port()
        processes = [
            subprocess.Popen(
                command(workdir, photos, f"train.steps={steps}", "checkpoint.every=2")
                + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=600) for p in processes]
        for process, (out, err) in zip(processes, outputs):
            assert process.returncode == 0, err[-4000:]
        return outputs

    launch(2)
    assert Checkpointer(workdir, None).latest_step() == 2
    outputs = launch(4)
    assert any("resumed from" in err for _, err in outputs)
    assert logged_steps(workdir)[-1] == 4 and logged_steps(workdir).count(1) == 1  # only process 0 logs
    assert exported_params(workdir) is not None
