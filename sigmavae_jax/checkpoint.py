"""Orbax checkpoints: the training checkpointer and the params-only export.

Training checkpoints: one CheckpointManager in `workdir/checkpoints`, a directory per step:
    <step>/state/    the train state (any pytree of arrays; typed PRNG keys as their uint32 data)
    <step>/data/     the data-iterator state (JSON)
    <step>/config/   the config (JSON, `config.to_dict`)
A save cut short (preemption, crash) is never taken for a checkpoint: on a local disk Orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete; on Cloud
Storage (`gs://`, where renaming is a copy) it writes `<step>/` in place and marks it complete
with a `commit_success.txt` written last.

Every path may be local or `gs://bucket/...` (`storage.path`).

A params export is a directory:
    params/       an Orbax (StandardCheckpointer) pytree of arrays
    config.yaml   the full config (usable as `--config`)
    export.json   what wrote it and from what
The checkpointer knows nothing of models: the train state is a generic pytree and params are
a nested dict of arrays.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from sigmavae_jax import storage
from sigmavae_jax.config import CheckpointConfig, Config, ConfigError, from_dict, to_dict
from sigmavae_jax.messages import key_summary

PARAMS_DIR, CONFIG_FILE, EXPORT_FILE = "params", "config.yaml", "export.json"
FORMAT = "sigmavae_jax.params/1"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"

PyTree = Any


def is_params_export(path: str | storage.Path) -> bool:
    path = storage.reachable(path)
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def save_params(path: str | storage.Path, params: dict[str, Any], config: Config, **export_info: Any) -> storage.Path:
    """Writes `params` (nested dict of arrays) and `config` to the directory `path`.

    Refuses to overwrite an existing non-empty directory, so nothing is lost by a typo.
    On several processes every process calls this; process 0 writes the small files.
    """
    path = storage.reachable(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    if jax.process_count() > 1:  # all processes checked before any of them writes
        multihost_utils.sync_global_devices(f"save_params:{path}")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, _string_keys(params))
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        info = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **export_info}
        (path / EXPORT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_params done:{path}")
    return path


def load_params(path: str | storage.Path) -> tuple[dict[str, Any], Config]:
    """Reads a params export (local or gs://): (nested dict of arrays with list indices as
    ints, config). Raises FileNotFoundError if `path` is not one, ValueError if its config or
    its Orbax metadata cannot be read (a damaged export), StorageError if its bucket cannot be
    reached."""
    path = storage.reachable(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a params export folder (or a Hub name where one is taken)"
        )
    if not is_params_export(path):
        raise FileNotFoundError(
            f"{path} is not a sigmavae_jax params export (a folder with {PARAMS_DIR}/ and {CONFIG_FILE}); "
            "convert torch weights first with `python convert_torch_weights.py WEIGHTS OUT_DIR` and give OUT_DIR"
        )
    redo = "copy the export again, or export or convert it again"
    try:
        tree = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path / CONFIG_FILE} is not valid YAML ({problem}): a damaged export; {redo}") from None
    config = from_dict(tree, str(path / CONFIG_FILE))
    # Restored into host numpy arrays of the stored shapes and dtypes: without a target Orbax
    # would place them by the saving run's device layout, which another process count refuses.
    # Closed on errors too: a checkpointer left open floods stderr from its threads at exit.
    _drop_closed_loop_reports()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path / PARAMS_DIR).item_metadata
        if metadata is None:
            raise ValueError(f"{path / PARAMS_DIR} holds no readable Orbax checkpoint: a damaged export; {redo}")
        try:
            restored = checkpointer.restore(
                path / PARAMS_DIR, jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), metadata.tree)
            )
        except Exception as error:  # tensorstore and Orbax raise many kinds for damaged files
            raise ValueError(
                f"{path / PARAMS_DIR} could not be read ({_failed_read(error)}): a damaged export; {redo}"
            ) from None
    return _int_keys(restored), config


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; list indices of NNX states are ints."""
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


# --- the training checkpointer ----------------------------------------------------------


class Checkpointer:
    """Saves and restores training checkpoints in `workdir/checkpoints` (one Orbax
    CheckpointManager; items: train state, data-iterator state, config).

    The loop decides when to save (every N steps, on SIGTERM, at the end); this class
    keeps the last `options.keep` steps and, with `options.async_save`, writes in the
    background: `save` returns once the arrays are copied to host memory, so the caller may
    donate or overwrite them straight away. On several processes every process must call
    `save`, `restore`, `wait` and `close` (they synchronise); only process 0 writes the
    JSON items.

        ckpt = Checkpointer(cfg.workdir, cfg.checkpoint)
        if ckpt.latest_step() is not None:
            step, state, data_state, _ = ckpt.restore(abstract_state)
        ...
        ckpt.save(step, state, iterator.get_state(), cfg)
        ckpt.close()
    """

    def __init__(self, workdir: str | storage.Path, options: CheckpointConfig | None = None):
        options = options or CheckpointConfig()
        self.directory = storage.reachable(workdir) / CHECKPOINTS_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=options.keep,
                enable_async_checkpointing=options.async_save,
                save_interval_steps=1,  # every step is eligible: the loop decides when
                # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`; it is never
                # listed as a step, and this removes it when the next run opens the directory.
                cleanup_tmp_directories=True,
            ),
            # Declared up front so a fresh process can read a step's metadata before any save.
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITEM: ocp.JsonCheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    def save(
        self, step: int, state: PyTree, data_state: dict[str, Any], config: Config, *, force: bool = False
    ) -> bool:
        """Saves checkpoint `step`; True if a save was started.

        state: any pytree of jax arrays (typed PRNG keys and None subtrees allowed).
        data_state: the data iterator's state, a JSON-serialisable dict (JSON turns tuples
        into lists and dict keys into strings). config: stored as `config.to_dict(config)`.
        A step already saved is never overwritten (False). Without `force`, a step that is
        not after the latest saved one is skipped too (False); `force` saves it anyway.
        With async saves, call `wait()` before relying on the files.
        """
        step = int(step)
        if step in self.all_steps():
            return False
        data = _checked_json(data_state)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(_keys_as_data(state)),
                DATA_ITEM: ocp.args.JsonSave(data),
                CONFIG_ITEM: ocp.args.JsonSave(to_dict(config)),
            }
        )
        return bool(self._manager.save(step, args=args, force=force))

    def restore(
        self, abstract_state: PyTree, *, step: int | None = None
    ) -> tuple[int, PyTree, dict[str, Any], dict[str, Any]]:
        """Restores the latest step (or `step`) into the shapes, dtypes and shardings of
        `abstract_state`: (step, state, data_state, config_dict).

        abstract_state: a pytree like the saved state whose leaves carry `.shape`, `.dtype`
        and `.sharding` (`jax.ShapeDtypeStruct`s, e.g. `with_shardings(jax.eval_shape(...),
        shardings)`, or live arrays). Its shardings may use another mesh or device count than
        the one that saved. The result has exactly its pytree structure (int dict keys, optax
        NamedTuples, None subtrees, typed PRNG keys). Raises FileNotFoundError for a missing
        step, ConfigError for a state of other shapes or structure, DamagedCheckpoint for files
        that cannot be read.
        """
        target = _keys_as_data(_abstract(abstract_state))
        self.wait()  # a pending async save may be the step asked for
        _drop_closed_loop_reports()
        step = self._existing_step(step)
        self._check_matches(step, target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardRestore(target),
                        DATA_ITEM: ocp.args.JsonRestore(),
                        CONFIG_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as error:  # tensorstore and Orbax raise many kinds for damaged files
            raise DamagedCheckpoint(self._damaged(step, error)) from None
        state = _keys_from_data(restored[STATE_ITEM], abstract_state)
        return step, state, restored[DATA_ITEM], restored[CONFIG_ITEM]

    def latest_step(self) -> int | None:
        """The highest saved step (including one still being written asynchronously), or None."""
        # Not Orbax's latest_step: after a forced save of an older step that answers with the
        # step saved last, while a restarted process (and `restore`) would take the highest.
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises if one of them failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoints in {self.directory}; nothing to restore (start from scratch, "
                "or set workdir= to a run that has checkpoints)"
            )
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def _damaged(self, step: int, error: Exception) -> str:
        earlier = [s for s in self.all_steps() if s < step]
        fallback = (
            f"to resume from step {earlier[-1]}, the latest before it"
            if earlier
            else "to start again from step 0 (no earlier checkpoint is kept)"
        )
        return (
            f"the checkpoint at step {step} in {self.directory} could not be read ({_failed_read(error)}). "
            f"If its files are damaged, move {self.directory / str(step)} out of {self.directory} {fallback}; "
            "if its storage failed for a moment, run again."
        )

    def _check_matches(self, step: int, target: PyTree) -> None:
        """Raises ConfigError naming what differs between the stored state and `target`, so a
        changed model or optimizer config fails here, in words, not deep inside Orbax."""
        try:  # opens every stored array, so damaged files fail here first
            stored = ocp.tree.to_flat_dict(self._manager.item_metadata(step)[STATE_ITEM])
        except Exception as error:
            raise DamagedCheckpoint(self._damaged(step, error)) from None
        wanted = ocp.tree.to_flat_dict(target)
        problems = _tree_differences(stored, wanted)
        if problems:
            raise ConfigError(
                f"the checkpoint at step {step} in {self.directory} does not match the train state "
                f"being restored ({problems}). It was written with another model/optimizer config "
                f"(the one it used is in {self.directory / str(step) / CONFIG_ITEM}). Resume with "
                "that config, or start this config in a fresh workdir (workdir=NEW_DIR)."
            )


class DamagedCheckpoint(ConfigError):
    """A training checkpoint whose files cannot be read; the message names the step and the way
    to resume from the one before it. A ConfigError, so train.py reports it in one line, exit 2."""


def _failed_read(error: Exception) -> str:
    """The type and first line of an Orbax/tensorstore read error (their messages run to pages
    of JSON specs)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _drop_closed_loop_reports() -> None:
    """When one read of an Orbax restore fails, the restore's event loop closes while tensorstore
    still runs the other reads; each of those, finishing, hands its result to the closed loop, and
    Python reports every one as an unraisable RuntimeError('Event loop is closed'): a traceback per
    array, after the error that matters. This drops those reports and passes every other unraisable
    exception to the hook that was there. Installed (once per process) before a restore: some
    of those reads finish before the error reaches the caller."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """`jax.eval_shape` output (or live arrays) + a matching tree of shardings ->
    ShapeDtypeStructs with shardings: the `abstract_state` that `Checkpointer.restore` takes."""

    def with_sharding(leaf, sharding):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(with_sharding, abstract, shardings)


def export_params(path: str | storage.Path, state: PyTree, config: Config, *, ema: bool) -> storage.Path:
    """Writes the generator params of a train state as a params export (`save_params`),
    readable by `sigmavae_jax.load(path)`.

    state: a train state with `params["vae"]`, `ema` (None when no EMA is kept) and `step`.
    ema: export the exponential moving average instead of the raw params.
    Sharded arrays are gathered to host numpy first (on several processes too; every process
    must call this).
    """
    if ema and state.ema is None:
        raise ValueError("ema=True but the train state keeps no EMA (train.ema_decay=0); export with ema=False")
    params = _to_host(state.ema if ema else state.params["vae"])
    step = int(_to_host(state.step))
    return save_params(path, params, config, source="training", step=step, ema=ema)


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _abstract(tree: PyTree) -> PyTree:
    """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs; every leaf must have a sharding."""

    def leaf_of(path, leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} ({leaf!r}) has no sharding; "
                "build it with checkpoint.with_shardings(jax.eval_shape(...), shardings)"
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf_of, tree)


def _keys_as_data(tree: PyTree) -> PyTree:
    """Typed PRNG keys (which Orbax cannot store) -> their uint32 data; works on arrays
    and on ShapeDtypeStructs (keeping the key's sharding: the data only adds a trailing dim)."""

    def as_data(leaf):
        if not _is_key(leaf):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, leaf)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
        return jax.random.key_data(leaf)

    return jax.tree.map(as_data, tree)


def _keys_from_data(restored: PyTree, abstract: PyTree) -> PyTree:
    """Undoes `_keys_as_data`: wraps the uint32 data where `abstract` holds a typed key."""

    def from_data(want, got):
        if not _is_key(want):
            return got
        key = jax.random.wrap_key_data(got, impl=_key_impl(want))
        return key if key.sharding == want.sharding else jax.device_put(key, want.sharding)

    return jax.tree.map(from_data, abstract, restored)


def _key_impl(abstract_key: Any) -> Any:
    """The PRNG implementation (threefry, rbg, ...) of a typed key or its ShapeDtypeStruct;
    `jax.random.key_impl` takes only arrays, so ask it of a traced stand-in."""
    found = []
    stand_in = jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype)
    jax.eval_shape(lambda key: found.append(jax.random.key_impl(key)), stand_in)
    return found[0]


def _checked_json(data_state: dict[str, Any]) -> dict[str, Any]:
    """Fails in the caller's thread, not in Orbax's background writer, on a bad data state."""
    if not isinstance(data_state, dict):
        raise TypeError(f"data_state must be a dict (the data iterator's state), got {type(data_state).__name__}")
    try:
        json.dumps(data_state)
    except (TypeError, ValueError) as error:
        raise TypeError(f"data_state must be JSON-serialisable: {error}") from None
    return data_state


def _tree_differences(stored: dict[tuple, Any], wanted: dict[tuple, Any]) -> str:
    """One line counting missing, unexpected and mis-shaped leaves ('' when none), given flat
    {path tuple: leaf with .shape and .dtype} dicts of the checkpoint and of the target."""

    def shape_dtype(leaf):
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    def name(path):
        return "/".join(path)

    misshaped = sorted(p for p in wanted.keys() & stored.keys() if shape_dtype(stored[p]) != shape_dtype(wanted[p]))
    return key_summary(
        [
            ("expected but not in the checkpoint", sorted(map(name, wanted.keys() - stored.keys()))),
            ("in the checkpoint but not expected", sorted(map(name, stored.keys() - wanted.keys()))),
            (
                "with another shape or dtype",
                [
                    "{} stored {} {} instead of {} {}".format(name(p), *shape_dtype(stored[p]), *shape_dtype(wanted[p]))
                    for p in misshaped
                ],
            ),
        ]
    )


def _to_host(tree: PyTree) -> PyTree:
    """jax arrays -> numpy, gathering shards held by other processes when there are any."""

    def to_numpy(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(to_numpy, tree)
