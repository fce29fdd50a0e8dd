"""train.py end to end, in subprocesses: exact resume after kill -9, SIGTERM, bad inputs,
and 2-process runs (jax.distributed over localhost, CPU collectives): save and resume, SIGTERM
to one process (JAX's preemption sync point), and no host collective on ordinary steps."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import sigmavae_jax
from sigmavae_jax import api, checkpoint, storage
from sigmavae_jax.checkpoint import Checkpointer
from sigmavae_jax.config import Config, load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = [
    "train.batch_size=4",
    "train.image_size=32",
    "loss.perceptual_weight=0",
    "loss.disc_start=3",
    "log.every=1",
    "log.images_every=1000",
    "optim.warmup_steps=0",
    "data.workers=0",
]


def environment(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    # The runs here compile the same few programs again and again: the session's persistent
    # compilation cache (tests/conftest.py) turns the repeats into cache hits.
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def command(workdir, photos, *extra) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        "tiny",
        f"workdir={workdir}",
        f"data.path={photos}",
        *BASE,
        *extra,
    ]


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
    process = subprocess.Popen(
        command(workdir, photos, *steps), env=environment(), stderr=subprocess.PIPE, text=True, cwd=REPO
    )
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
    # the steps the killed run logged after its checkpoint were logged again, not twice
    assert logged_steps(workdir) == list(range(1, 61))
    # a finished run, rerun, says so without compiling anything
    again = run(command(workdir, photos, *steps))
    assert "the run is at step 60, train.steps=60: nothing to train" in again.stderr
    assert "compiled the train step" not in again.stderr and logged_steps(workdir) == list(range(1, 61))

    # resuming with another model or batch size: exit 2 in words, the run's files untouched
    before = {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()}
    for changed, message in [
        ("model.z_channels=8", "does not match the train state being restored"),
        ("train.batch_size=8", "batch_size: saved 4, now 8"),
    ]:
        done = subprocess.run(
            command(workdir, photos, *steps, changed), env=environment(), capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == before

    # the latest checkpoint's array files lost: exit 2 naming the step and the one to resume from,
    # without Orbax's tracebacks, and nothing else touched
    lost = [chunk for chunk in (workdir / "checkpoints" / "60" / "state").glob("d/*") if chunk.is_file()]
    for chunk in lost:
        chunk.unlink()
    done = subprocess.run(command(workdir, photos, *steps), env=environment(), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the checkpoint at step 60" in done.stderr and "to resume from step 55" in done.stderr
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == {
        path: data for path, data in before.items() if path not in lost
    }


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_sigterm_saves_at_the_current_step_and_exits_zero(tmp_path, photos):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir, photos, "train.steps=1000", "checkpoint.every=500"),
        env=environment(),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
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

    # Ctrl-C in the resumed run: one line on how to resume, status 130, no traceback
    logged = len(logged_steps(workdir))
    # A shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored: the
    # child turns Ctrl-C back on before it runs train.py (not a preexec_fn: Python code between
    # fork and exec can deadlock a multithreaded parent such as this JAX process).
    with_ctrl_c = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    train_py, *arguments = command(workdir, photos, "train.steps=1000", "checkpoint.every=500", "optim.lr=2e-6")[1:]
    process = subprocess.Popen(
        [sys.executable, "-c", with_ctrl_c, train_py, *arguments],
        env=environment(),
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_for(lambda: len(logged_steps(workdir)) > logged, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-4000:]
    assert f"interrupted; the same command resumes from the last checkpoint in {workdir}" in err
    assert "resuming with settings changed since step" in err and "optim.lr: 0.0003 -> 2e-06" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_ctrl_c_swallowed_where_it_landed_is_raised_again_at_the_next_step():
    from sigmavae_jax.train.loop import Interruption

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore it
    try:
        interruption = Interruption()
        try:
            interruption.check()  # nothing yet
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises here
            except KeyboardInterrupt:
                pass  # as a __del__ or a finalizer running at that moment would drop it
            with pytest.raises(KeyboardInterrupt):
                interruption.check()
        finally:
            interruption.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # an ignored SIGINT (a shell's background job) stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ignored = Interruption()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ignored.close()
    finally:
        signal.signal(signal.SIGINT, before)


WRITE_METRICS = """
import sys
import numpy as np
from sigmavae_jax import storage
from sigmavae_jax.train.loop import MetricsWriter

writer = MetricsWriter(storage.path(sys.argv[1]), active=True)
writer.scalars(3, {"loss": 0.25})
writer.image(3, "reconstruction", np.zeros((4, 4, 3), np.uint8))
writer.close()
print("torch" in sys.modules)
import torch  # still importable
"""


def test_metrics_writer_does_not_import_torch_and_writes_events(tmp_path):
    from tensorboardX.proto import event_pb2

    done = subprocess.run([sys.executable, "-c", WRITE_METRICS, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr[-3000:]
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    # TFRecord framing: an 8-byte length, its 4-byte CRC, the record, the record's 4-byte CRC
    raw, records = events.read_bytes(), []
    while raw:
        length = int.from_bytes(raw[:8], "little")
        records.append(event_pb2.Event.FromString(raw[12 : 12 + length]))
        raw = raw[16 + length :]
    values = {(event.step, value.tag): value for event in records for value in event.summary.value}
    assert values[3, "loss"].simple_value == 0.25 and values[3, "reconstruction"].image.height == 4
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 0.25}


def test_bad_config_values_name_the_key(tmp_path, photos):
    done = subprocess.run(
        command(tmp_path / "bad", photos, "train.batch_sise=4"),
        env=environment(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2 and "train.batch_sise: unknown key" in done.stderr
    done = subprocess.run(
        command(tmp_path / "bad", photos, "optim.lr=-1"), env=environment(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "optim.lr" in done.stderr
    # a mesh the devices cannot form: the key, the values that fit, no traceback
    done = subprocess.run(
        command(tmp_path / "bad", photos, "train.mesh_fsdp=3"),
        env=environment(devices=2),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2 and "train.mesh_fsdp=3 must divide the 2 devices; use one of [1, 2]" in done.stderr
    assert "Traceback" not in done.stderr
    # a data path that is not there stops the run before any model or checkpoint folder is made
    missing = tmp_path / "no_photos"
    done = subprocess.run(
        command(tmp_path / "bad", missing), env=environment(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and f"image folder '{missing}' does not exist" in done.stderr
    assert not (tmp_path / "bad").exists()
    # a workdir that is a file, and a damaged --init export: one error line each, before any model is built
    (tmp_path / "a_file").write_text("")
    done = subprocess.run(
        command(tmp_path / "a_file", photos), env=environment(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and f"workdir={tmp_path / 'a_file'} cannot be written" in done.stderr
    model_cfg = load_config("tiny").model
    damaged = checkpoint.save_params(
        tmp_path / "damaged", api.params_of(api.build_model(model_cfg, seed=0)), Config(model=model_cfg)
    )
    for part in (damaged / checkpoint.PARAMS_DIR).iterdir():  # an interrupted copy: the folder, no files
        shutil.rmtree(part) if part.is_dir() else part.unlink()
    done = subprocess.run(
        [*command(tmp_path / "bad", photos), "--init", str(damaged)],
        env=environment(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2 and "--init: " in done.stderr and "a damaged export" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "bad").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- two processes: preemption through JAX's sync point, no host collective per step ------

TWO_PROCESS_STEPS = 30  # the preempted run must stop well before the end, at any machine speed


def start_two(argv_of, logs: pathlib.Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a 2-process job, `argv_of(i, coordinator_address)`, with their
    stdout/stderr in files under `logs` (Orbax's logging would fill a pipe nobody reads)."""
    address = f"127.0.0.1:{free_port()}"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for i in range(2):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            processes.append(
                subprocess.Popen(
                    argv_of(i, address), env=env or environment(), stdout=out, stderr=err, text=True, cwd=REPO
                )
            )
    return processes


def train_argv(workdir, photos, *extra):
    """argv_of for `start_two`: train.py with the coordinator flags."""
    return lambda i, address: (
        command(workdir, photos, *extra)
        + [
            "--coordinator",
            address,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
    )


def finish(processes, logs: pathlib.Path, timeout=600) -> list[tuple[str, str]]:
    """Waits for every process (killing all of them after `timeout` s); asserts exit code 0;
    returns each one's (stdout, stderr)."""
    deadline, killed = time.time() + timeout, False
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        killed = True
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [((logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()) for i in range(len(processes))]
    for i, (process, (_, err)) in enumerate(zip(processes, outputs)):
        ended = f"was killed after {timeout} s" if killed else f"exited with {process.returncode}"
        assert process.returncode == 0, f"process {i} {ended}: {err[-4000:]}"
    return outputs


@pytest.fixture(scope="module")
def counted_two_process_run(tmp_path_factory, photos):
    """An uninterrupted 2-process run of TWO_PROCESS_STEPS steps (checkpoint, metrics and
    images only at the end), each process counting its host collectives with
    tests/collectives_driver.py: (workdir, the two processes' reports)."""
    root = tmp_path_factory.mktemp("counted")
    workdir = root / "run"
    overrides = [
        f"workdir={workdir}",
        f"data.path={photos}",
        *BASE,
        f"train.steps={TWO_PROCESS_STEPS}",
        "checkpoint.every=1000",
        "log.every=1000",
    ]
    driver = str(REPO / "tests" / "collectives_driver.py")
    processes = start_two(
        lambda i, address: [sys.executable, driver, str(root / f"report_{i}.json"), address, "2", str(i), *overrides],
        root / "logs",
    )
    finish(processes, root / "logs")
    return workdir, [json.loads((root / f"report_{i}.json").read_text()) for i in range(2)]


def test_two_processes_run_no_host_collective_on_ordinary_steps(counted_two_process_run):
    _, reports = counted_two_process_run
    last = TWO_PROCESS_STEPS
    for report in reports:
        assert (report["step"], report["reason"]) == (last, "done")
        # Orbax's CheckpointManager.save asks the sync point too, so a checkpoint's step may
        # appear more than once; on the other steps only the loop asks, once, at the step's end.
        steps = [step for step, _ in report["marks"]]
        assert steps == sorted(steps) and set(range(1, last + 1)) <= set(steps), (
            f"the preemption sync point was not asked at every step, in order: {steps}"
        )
        count = dict(report["marks"])  # step -> host collectives so far, at the end of that step
        ordinary = [count[step] for step in range(1, last)]
        assert ordinary == [count[1]] * (last - 1), (
            f"process {report['process']}: host collectives ran on ordinary steps 2..{last - 1} "
            f"(running count per step {ordinary}; calls {report['calls']})"
        )
        # the final checkpoint (a gather of the data states, Orbax's barriers) is seen by the counter
        assert count[last] > count[last - 1], report


def committed_steps(gcs, bucket: str, checkpoints: str) -> list[int]:
    """The steps under gs://bucket/checkpoints/ that Orbax has finished: on Cloud Storage
    (no renames) the ones holding its commit file, `<step>/commit_success.txt`."""
    depth = checkpoints.count("/") + 2
    return sorted(
        int(name.split("/")[-2])
        for name in gcs.objects(bucket, checkpoints + "/")
        if name.endswith("/commit_success.txt") and name.count("/") == depth
    )


def progress_steps(stderr_file: pathlib.Path, total: int) -> int:
    """The last step process 0's progress bar shows in its stderr (0 before the first)."""
    shown = re.findall(rf"(\d+)/{total} \[", stderr_file.read_text(errors="replace"))
    return int(shown[-1]) if shown else 0


def test_sigterm_to_one_of_two_processes_on_gs_saves_the_same_step_and_resumes_exactly(
    gcs, tmp_path, photos, counted_two_process_run
):
    """The pod setup: the workdir in a bucket both processes reach (here the local Cloud
    Storage emulator); SIGTERM to one process; then the same command again."""
    bucket, last = gcs.new_bucket(), TWO_PROCESS_STEPS
    workdir, env = f"gs://{bucket}/run", {**environment(), **gcs.environment()}
    argv = train_argv(workdir, photos, f"train.steps={last}", "checkpoint.every=1000")
    logs = tmp_path / "preempted"
    processes = start_two(argv, logs, env)
    deadline = time.time() + 300
    while (
        progress_steps(logs / "0.err", last) < 2 and time.time() < deadline and all(p.poll() is None for p in processes)
    ):
        time.sleep(0.05)  # until both have compiled and are training
    # Process 1 writes no metrics and holds no flag anyone reads: only JAX's preemption
    # service can tell process 0.
    if processes[1].poll() is None:
        processes[1].send_signal(signal.SIGTERM)
    outputs = finish(processes, logs, timeout=300)
    stopped = []
    for out, _ in outputs:
        assert "preempted at step" in out, f"not preempted before step {last}: {out[-2000:]}"
        stopped.append(int(out.split("preempted at step ")[1].split(";")[0]))
    assert stopped[0] == stopped[1], stopped
    stop = stopped[0]
    assert 2 <= stop < last  # the service stops after the furthest step any process had reached
    # one checkpoint, written by both processes into the bucket, finished with Orbax's commit file
    assert committed_steps(gcs, bucket, "run/checkpoints") == [stop]
    names = gcs.objects(bucket, "run/checkpoints/")
    assert {name.split("/")[2] for name in names} == {str(stop)}, sorted(names)
    assert not any(".orbax-checkpoint-tmp" in name for name in names), sorted(names)

    outputs = finish(start_two(argv, tmp_path / "resumed", env), tmp_path / "resumed")
    for out, err in outputs:
        assert f"resumed from {workdir}/checkpoints at step {stop}" in err
        assert f"done at step {last}; workdir {workdir}" in out
    # each step logged once across the preemption (the log reaches the bucket when a run closes it)
    logged = [json.loads(line)["step"] for line in storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, last + 1))
    assert not (REPO / "gs:").exists()  # what pathlib made of gs:// URLs before

    reference = counted_two_process_run[0]
    for ema, suffix in ((False, ""), (True, "_ema")):
        resumed = sigmavae_jax.load(f"{workdir}/export/step_{last:08d}{suffix}").params
        for a, b in zip(jax_leaves(exported_params(reference, ema)), jax_leaves(resumed), strict=True):
            np.testing.assert_array_equal(a, b)
