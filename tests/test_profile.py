"""log.profile_at: a jax.profiler trace of exactly the asked steps, in the workdir's TensorBoard folder."""

import gzip
import json

import pytest

from sigmavae_jax.config import ConfigError, load_config
from sigmavae_jax.train.loop import train


def dispatches(trace: dict, name: str) -> list[float]:
    """Start times of the host's calls of `name` that are not nested in another call of it
    (the profiler records a jitted call and the compiled call inside it under one name)."""
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("name") == name)
    outer = [c for c in calls if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in calls)]
    return [start for start, _ in outer]


def test_the_asked_steps_are_traced_into_the_tensorboard_folder(tmp_path, photos):
    cfg = load_config(
        "tiny",
        [
            f"workdir={tmp_path / 'run'}",
            f"data.path={photos}",
            "data.workers=0",
            "train.batch_size=8",
            "train.image_size=32",
            "train.steps=5",
            "loss.perceptual_weight=0",
            "log.every=1000",
            "log.images_every=1000",
            "checkpoint.every=1000",
            "log.profile_at=2",
            "log.profile_steps=2",
        ],
    )
    result = train(cfg, show_progress=False)
    assert (result.step, result.reason) == (5, "done")
    folder = tmp_path / "run" / "tensorboard" / "plugins" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["steps_2-3"]
    files = sorted(p.name for p in (folder / "steps_2-3").iterdir())
    assert files == ["process_0.trace.json.gz", "process_0.xplane.pb"]
    assert (folder / "steps_2-3" / "process_0.xplane.pb").stat().st_size > 0
    trace = json.loads(gzip.decompress((folder / "steps_2-3" / "process_0.trace.json.gz").read_bytes()))
    assert len(dispatches(trace, "PjitFunction(jit(train_step))")) == 2  # steps 2 and 3, not 1, 4 or 5


def test_profile_at_counts_from_step_one():
    with pytest.raises(ConfigError, match="log.profile_at"):
        load_config("tiny", ["log.profile_at=0"])


def test_a_trace_lands_in_a_bucket_and_a_run_that_stops_early_keeps_what_it_traced(gcs):
    """StepProfiler alone (a small jitted function for a step) on a gs:// workdir: the run ends
    after step 2 of the asked 2-4, and `close()` stops the trace and keeps steps 2-2."""
    import jax
    import jax.numpy as jnp

    from sigmavae_jax import storage
    from sigmavae_jax.train.profile import StepProfiler

    bucket = gcs.new_bucket()
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    profiler = StepProfiler(storage.path(f"gs://{bucket}/run"), first=2, count=3)
    x = jnp.ones((64, 64))
    for step in (1, 2):
        profiler.before(step)
        x = step_fn(x)
        profiler.after(step, x)
    profiler.close()
    objects = sorted(gcs.objects(bucket, "run/"))
    folder = "run/tensorboard/plugins/profile/steps_2-2"
    assert objects == [f"{folder}/process_0.trace.json.gz", f"{folder}/process_0.xplane.pb"], objects
    with storage.local_copy(f"gs://{bucket}/{folder}/process_0.trace.json.gz") as copy:
        trace = json.loads(gzip.decompress(copy.read_bytes()))
    assert len(dispatches(trace, "PjitFunction(<lambda>)")) == 1  # step 2 only
    profiler.close()  # a second close does nothing
