"""The training loop: data -> step -> metrics / images -> checkpoint, with exact resume,
preemption handling and a NaN guard. `train(cfg)` is what train.py calls.

The workdir may be local or `gs://bucket/run` (every file goes through `storage`). On ordinary
steps the loop runs no host collective and never waits for the step it has just dispatched:
it reads the previous step's scalars one step late, and everything that needs the host
(metrics, images, checkpoints, preemption saves) happens only on the steps that do it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from sigmavae_jax import data, parallel, storage, viz
from sigmavae_jax.checkpoint import Checkpointer, export_params, load_params, with_shardings
from sigmavae_jax.config import Config, ConfigError, to_dict
from sigmavae_jax.models.params import check_params
from sigmavae_jax.train.profile import StepProfiler
from sigmavae_jax.train.program import build_program
from sigmavae_jax.train.state import TrainState, TrainStructure, create_state, learning_rate_schedule

log = logging.getLogger("sigmavae_jax")
PREVIEW_IMAGES = 8


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    step: int
    reason: str  # "done" | "preempted"
    workdir: storage.Path
    export: storage.Path | None  # params export of the final state (raw params)
    skipped_steps: int


class Preemption:
    """Says, once per step, whether to save and stop because the machines are being taken away
    (TPU VMs and schedulers send SIGTERM first).

    One process: a Python SIGTERM handler, installed here and removed by `close()`, sets a flag
    that `reached(step)` reads.

    Several processes: all must save the same step, so `reached(step)` asks JAX's preemption
    sync service (`multihost_utils.reached_preemption_sync_point`), which jax.distributed starts
    by default. The service catches SIGTERM itself (a C++ handler), tells the other processes,
    agrees in the background on the step after the furthest process's latest one, and answers
    True on every process at that same step. Until a notice arrives the call is a local check
    (after one, it waits once while the processes agree), so ordinary steps run no host
    collective. No Python handler is installed in this case: it would replace the service's
    (jax.distributed.initialize installs it) and the notice would never be sent.
    """

    def __init__(self, first_step: int):
        self.requested = False
        self._shared = jax.process_count() > 1
        self._previous = None
        if self._shared:
            # Tell the service where this run starts: before the first call it takes every
            # process to be at step 0, and a resumed run would never meet a sync step of 1.
            try:
                multihost_utils.reached_preemption_sync_point(first_step)
            except RuntimeError as error:
                raise ConfigError(
                    f"{jax.process_count()} processes need JAX's preemption sync service to save together "
                    f"on SIGTERM, and it is not running ({error}); leave jax_enable_preemption_service on "
                    "(the default) when calling jax.distributed.initialize"
                ) from None
        else:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """True at the step where this run must save and stop (the same step on every process).
        With several processes it must be called at every step, with increasing steps."""
        if self._shared:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Interruption:
    """Ctrl-C, never lost. Python raises KeyboardInterrupt wherever the main thread is when SIGINT
    arrives; raised inside a `__del__` or a finalizer it is reported as ignored, and training
    would go on. The handler installed here (only over Python's default one, so an ignored SIGINT
    stays ignored, and only from the main thread) raises it as before and also records it;
    `check()`, once per step, raises it again if it was swallowed. `close()` restores the handler."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class MetricsWriter:
    """Process 0 writes TensorBoard events and `metrics.jsonl`; other processes write nothing.
    In a `gs://` workdir both go to the bucket: tensorboardX uploads its event file itself
    (google-cloud-storage), and `metrics.jsonl` is uploaded whole at most every 30 s and on
    `close()` (`storage.AppendLog`; Cloud Storage objects cannot be appended to)."""

    def __init__(self, workdir: storage.Path, active: bool, resumed_at: int | None = None):
        """resumed_at: the step a resumed run restored. What the stopped run logged after it
        (steps it ran after its last checkpoint) is dropped, since they are run and logged again."""
        self.active = active
        self.tb = None
        if active:
            purge = None if resumed_at is None else resumed_at + 1
            self.tb = _summary_writer_class()(str(workdir / "tensorboard"), purge_step=purge)
            if resumed_at is not None:
                _drop_metrics_after(workdir / "metrics.jsonl", resumed_at)
            self.jsonl = storage.AppendLog(workdir / "metrics.jsonl")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write_line(json.dumps({"step": step, **values}))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active:
            self.tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported as on a machine without torch.

    Where torch is installed (the convert and test extras), `import tensorboardX` imports it
    too, only to accept torch tensors, which this writer is never given (its cost per training
    process: docs/performance.md). Hidden from that one import, torch stays importable after."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _drop_metrics_after(path: storage.Path, step: int) -> None:
    """Rewrites the metrics log without its lines past `step` (and any line cut short by a
    crash), whole or not at all."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")

    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) < len(lines):
        storage.write_bytes_atomically(path, "".join(line + "\n" for line in kept).encode())


def _data_state(iterator) -> dict[str, Any]:
    """Every process reads its own shard, so every process's iterator state is saved."""
    return {"processes": parallel.gather_json(iterator.get_state())}


def _init_params(path: str, cfg: Config) -> dict[str, Any]:
    """VAE params from a params export (convert_torch_weights.py or a finished run). Raises
    ConfigError for a damaged export or one that does not fit the model, FileNotFoundError
    for a path that is not an export."""
    try:
        params, init_cfg = load_params(path)
    except ConfigError:
        raise
    except ValueError as error:  # a damaged export, in words (checkpoint.load_params)
        raise ConfigError(f"--init: {error}") from None
    try:
        check_params(params, cfg.model)
    except ValueError as error:
        raise ConfigError(f"--init {path} does not fit model config of this run: {error}") from None
    differing = [
        key
        for key, value in to_dict(init_cfg.model).items()
        if key not in ("noise", "sample_posterior") and to_dict(cfg.model)[key] != value
    ]
    if differing:
        log.warning("--init %s was exported with different model settings %s; using this run's", path, differing)
    return params


def _export_final(workdir: storage.Path, state: TrainState, cfg: Config, step: int) -> storage.Path:
    """export/step_N (and step_N_ema with EMA) of the final state, unless already written."""
    export = workdir / "export" / f"step_{step:08d}"
    if not export.exists():
        export_params(export, state, cfg, ema=False)
        if state.ema is not None:
            export_params(export.with_name(export.name + "_ema"), state, cfg, ema=True)
    return export


def _changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """ "key: saved -> now" for every setting (dotted key) that differs between two config dicts."""
    changed = []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changed


def _make_writable(workdir: storage.Path) -> None:
    """Creates `workdir` (a no-op on Cloud Storage, which has no folders) and checks that files
    can be written in it, before anything is built. Raises ConfigError naming it otherwise."""
    if storage.is_remote(str(workdir)):
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{jax.process_index()}_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"workdir={workdir} cannot be written ({error.strerror or error}); choose another workdir"
        ) from None


def _preview_batch(cfg: Config) -> np.ndarray:
    """A fixed batch of eval-transformed images for the reconstruction grids."""
    for images, count in data.eval_batches(
        cfg, size=cfg.train.image_size, batch_size=PREVIEW_IMAGES, limit=PREVIEW_IMAGES
    ):
        return images[:count]
    raise ConfigError("the data source holds no readable image")


def _make_reconstruct(modules: TrainStructure):
    @jax.jit
    def reconstruct(vae_params, images):
        vae = nnx.merge(modules.vae, vae_params)
        return vae(images)[0]  # eval mode: posterior mode, no noise

    return reconstruct


def _save_preview(step, state: TrainState, preview, reconstruct, workdir: storage.Path, writer: MetricsWriter):
    rows = [preview, np.asarray(reconstruct(state.params["vae"], preview))]
    if state.ema is not None:
        rows.append(np.asarray(reconstruct(state.ema, preview)))
    grid = viz.reconstruction_grid(rows)
    if writer.active:
        viz.save_png(workdir / "images" / f"reconstructions_{step:08d}.png", grid)
        writer.image(step, "reconstructions", grid)


def train(cfg: Config, *, init: str | None = None, show_progress: bool = True) -> RunResult:
    """Trains (or resumes training in cfg.workdir, local or `gs://`) until cfg.train.steps, or
    until a preemption notice (SIGTERM), after which every process has saved the same step.
    Raises ConfigError for unusable settings and storage.StorageError for a workdir whose
    bucket is missing or does not answer."""
    if cfg.data is None:
        raise ConfigError("training needs data: data.source=folder data.path=DIR, or data.source=tfds data.name=NAME")
    workdir = storage.reachable(cfg.workdir)
    main_process = jax.process_index() == 0

    with contextlib.ExitStack() as cleanup:  # closed in reverse order, on errors too
        # The inputs (data, --init) and the mesh first, then the workdir: a wrong path, dataset
        # name, export or mesh stops the run before the models are built and leaves no workdir.
        iterator = data.train_iterator(
            cfg, seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count()
        )
        cleanup.callback(iterator.close)
        vae_params = _init_params(init, cfg) if init else None
        mesh = parallel.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp)
        _make_writable(workdir)
        program = build_program(cfg, mesh)
        modules, lpips_vars = program.modules, program.lpips_vars
        state, shardings = create_state(cfg, modules, mesh, jax.random.key(cfg.seed), vae_params)
        checkpointer = Checkpointer(workdir, cfg.checkpoint)
        cleanup.callback(checkpointer.close)
        latest = checkpointer.latest_step()
        # Listening before the restore and the compile (minutes on a pod): a notice that comes
        # meanwhile is acted on at the first step instead of being lost.
        preemption = Preemption(latest or 0)
        cleanup.callback(preemption.close)
        interruption = Interruption()
        cleanup.callback(interruption.close)
        if latest is not None:
            restored_step, state, data_state, saved_cfg = checkpointer.restore(with_shardings(state, shardings))
            iterator.set_state(data_state["processes"][jax.process_index()])
            log.info("resumed from %s at step %d", checkpointer.directory, restored_step)
            if init:
                log.info("--init %s is not used: a resumed run continues from its checkpoint", init)
            changed = _changed_settings(saved_cfg, json.loads(json.dumps(to_dict(cfg))))  # as JSON stored it
            if changed:
                log.warning("resuming with settings changed since step %d: %s", restored_step, "; ".join(changed))
        if main_process:
            (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        if int(state.step) >= cfg.train.steps:  # a finished run, rerun: nothing to compile
            step = int(state.step)
            log.info(
                "the run is at step %d, train.steps=%d: nothing to train (raise train.steps to go on)",
                step,
                cfg.train.steps,
            )
            export = _export_final(workdir, state, cfg, step)
            return RunResult(step=step, reason="done", workdir=workdir, export=export, skipped_steps=0)

        step_fn = program.step
        batch = parallel.global_batch(next(iterator), mesh)
        start = time.perf_counter()
        step_fn = step_fn.lower(state, batch, lpips_vars).compile()
        memory = step_fn.memory_analysis()
        log.info(
            "compiled the train step in %.1f s%s",
            time.perf_counter() - start,
            f" (temp {memory.temp_size_in_bytes / 2**20:.0f} MiB)" if memory is not None else "",
        )
        preview = _preview_batch(cfg)
        reconstruct = _make_reconstruct(modules)
        writer = MetricsWriter(workdir, main_process, resumed_at=int(state.step) if latest is not None else None)
        cleanup.callback(writer.close)
        schedule = learning_rate_schedule(cfg.optim, cfg.optim.lr, cfg.train.steps)

        step = int(state.step)
        first_step, total = step, cfg.train.steps
        progress = tqdm(
            total=total, initial=step, unit="step", disable=not (main_process and show_progress), dynamic_ncols=True
        )
        cleanup.callback(progress.close)
        profiler = StepProfiler(workdir, cfg.log.profile_at, cfg.log.profile_steps)
        cleanup.callback(profiler.close)
        window_start, window_steps = time.perf_counter(), 0
        nonfinite_run, skipped_steps, reason = 0, 0, "done"
        pending = None  # the previous step's metrics, read one step late so the host never waits
        if step == first_step and step == 0:
            _save_preview(step, state, preview, reconstruct, workdir, writer)
        # Every line of this loop either dispatches work, reads the previous step (`pending`),
        # or runs only on a logging, image, checkpoint or preemption step.
        while step < total:
            profiler.before(step + 1)
            state, metrics = step_fn(state, batch, lpips_vars)
            step += 1
            profiler.after(step, metrics)
            window_steps += 1
            if pending is not None:  # the previous step: done or nearly, while this one runs
                skipped = int(pending["skipped"])
                nonfinite_run = nonfinite_run + 1 if skipped else 0
                skipped_steps += skipped
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{nonfinite_run} steps in a row had a non-finite loss or gradient (step {step - 1}); "
                        f"stopped. The last good checkpoint in {checkpointer.directory} is kept; lower optim.lr "
                        "or set optim.grad_clip and resume"
                    )
            pending = metrics
            if step % cfg.log.every == 0 or step == total:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                values.update(
                    lr=float(schedule(step - 1)),
                    images_per_s=window_steps * cfg.train.batch_size / elapsed,
                    skipped_steps=skipped_steps,
                    skipped_images=iterator.skipped()["skipped"],
                )
                writer.scalars(step, values)
                progress.set_postfix(loss=f"{values['loss']:.4g}", img_s=f"{values['images_per_s']:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.log.images_every == 0 or step == total:
                _save_preview(step, state, preview, reconstruct, workdir, writer)
            if step % cfg.checkpoint.every == 0 or step == total:
                checkpointer.save(step, state, _data_state(iterator), cfg)
            progress.update(1)
            interruption.check()
            # asked at every step, the last too: the sync service needs each process's step
            if preemption.reached(step) and step < total:
                checkpointer.save(step, state, _data_state(iterator), cfg, force=True)
                reason = "preempted"
                log.warning(
                    "preemption notice (SIGTERM): saved a checkpoint at step %d in %s; exiting",
                    step,
                    checkpointer.directory,
                )
                break
            if step < total:
                batch = parallel.global_batch(next(iterator), mesh)
        checkpointer.wait()
        export = _export_final(workdir, state, cfg, step) if reason == "done" else None
        return RunResult(step=step, reason=reason, workdir=workdir, export=export, skipped_steps=skipped_steps)
