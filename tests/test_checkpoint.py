"""The training checkpointer on a real TrainState: bit-exact round trips (PRNG key, optax
states, int-keyed dicts, ema=None), async saves and keep-last-N, restores onto other meshes
and device counts, half-written steps ignored, clear errors, and the params export."""

import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sigmavae_jax
from sigmavae_jax import checkpoint, parallel
from sigmavae_jax.config import CheckpointConfig, from_dict, load_config, to_dict
from sigmavae_jax.train.state import build_structure, create_state, init_state

OVERRIDES = ["loss.perceptual_weight=0", "train.fsdp_min_size=256"]
FSDP_MIN_SIZE = 256
DATA_STATE = {"next_index": 56, "epoch": 1, "sources": {"train": [3, 1, 2]}}
SYNC = CheckpointConfig(keep=3, async_save=False)


@pytest.fixture(scope="module")
def run():
    """cfg, modules, the abstract TrainState (no shardings) and a 'trained' state on a 4x2
    (data, fsdp) mesh of the 8 devices, built once: the sharded init is the slow part."""
    cfg = load_config("tiny", OVERRIDES)
    modules = build_structure(cfg)
    mesh = parallel.make_mesh(4, 2)
    state, _ = create_state(cfg, modules, mesh, jax.random.key(0))
    abstract = jax.eval_shape(lambda key: init_state(cfg, modules, key), jax.random.key(0))
    return SimpleNamespace(cfg=cfg, modules=modules, mesh=mesh, abstract=abstract, state=scrambled(state, seed=1))


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    """A workdir holding run.state saved at step 7 from the 4x2 mesh (saves are the slow
    part on 2 cores, so the tests that only read share it)."""
    workdir = tmp_path_factory.mktemp("saved")
    save_steps(workdir, run.state, run.cfg, [7])
    return workdir


def scrambled(state, seed):
    """A copy of `state` with every leaf replaced by seeded random values (same shapes, dtypes
    and shardings), so equal leaves mean restored bits, not shared zeros."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = rng.integers(0, 2**32, jax.random.key_data(x).shape, dtype=np.uint32)
            return jax.random.wrap_key_data(jax.device_put(data, x.sharding), impl=jax.random.key_impl(x))
        if np.issubdtype(x.dtype, np.integer):
            value = rng.integers(0, 1000, x.shape).astype(x.dtype)
        else:
            value = rng.standard_normal(x.shape).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(leaf, state)


def target_on(run, mesh, abstract=None):
    """The abstract state with the shardings `create_state` would give on `mesh`."""
    abstract = run.abstract if abstract is None else abstract
    return checkpoint.with_shardings(abstract, parallel.tree_shardings(mesh, abstract, FSDP_MIN_SIZE))


def moved(state, target):
    """`state` resharded onto the shardings of `target` (another mesh or device count)."""
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), state, target)


def as_bits(x):
    """(dtype, raw bytes) of a leaf; typed PRNG keys by their uint32 data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return str(x.dtype), np.asarray(jax.random.key_data(x)).tobytes()
    return str(x.dtype), np.asarray(x).tobytes()


def assert_identical(got, want):
    """Same pytree structure (dict key types, NamedTuples, None) and bit-identical leaves."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert as_bits(a) == as_bits(b), f"leaf {jax.tree_util.keystr(path)} differs"


def assert_sharded_like(state, target):
    for (path, x), t in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(target)):
        assert x.sharding == t.sharding, f"{jax.tree_util.keystr(path)}: {x.sharding} != {t.sharding}"


def save_steps(workdir, state, cfg, steps, options=SYNC):
    with checkpoint.Checkpointer(workdir, options) as ckpt:
        for step in steps:
            assert ckpt.save(step, state, DATA_STATE, cfg)


def test_round_trip_is_bit_exact(run, saved):
    target = target_on(run, run.mesh)
    with checkpoint.Checkpointer(saved, SYNC) as ckpt:  # a fresh manager, as after a restart
        step, state, data_state, config = ckpt.restore(target)
    assert step == 7 and data_state == DATA_STATE
    assert config == to_dict(run.cfg) and from_dict(config) == run.cfg
    assert_identical(state, run.state)
    assert_sharded_like(state, target)
    # what Orbax alone would get wrong: int keys, optax NamedTuples, the typed key
    assert 0 in state.params["vae"]["decoder"]["up"]
    assert type(state.opt_state) is type(run.state.opt_state)
    assert state.rng.dtype == run.state.rng.dtype


def test_async_saves_keep_the_last_n_and_survive_donation(run, tmp_path):
    options = CheckpointConfig(keep=2, async_save=True)
    target = target_on(run, parallel.make_mesh(1, 2, devices=jax.devices()[:2]))  # fsdp, quicker than 8
    with checkpoint.Checkpointer(tmp_path, options) as ckpt:
        for step in (1, 2, 3):
            state = scrambled(moved(run.state, target), seed=step)
            assert ckpt.save(step, state, {"next_index": step}, run.cfg)
            # save returns once the arrays are on the host: the step may donate them at once
            jax.tree.map(lambda x: x.delete(), state)
        assert not ckpt.save(3, run.state, DATA_STATE, run.cfg)  # never overwritten
        assert not ckpt.save(1, run.state, DATA_STATE, run.cfg)  # not after the latest
        ckpt.wait()
        assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]
        step, restored, data_state, _ = ckpt.restore(target, step=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert step == 2 and data_state == {"next_index": 2}
    assert_identical(restored, scrambled(moved(run.state, target), seed=2))


@pytest.mark.parametrize(
    "data, fsdp, devices",
    [(1, 2, slice(6, 8)), (2, 1, slice(0, 2)), (1, 1, slice(3, 4))],
    ids=["2dev-fsdp", "2dev-replicated", "1dev"],
)
def test_fsdp_4x2_checkpoint_restores_on_fewer_devices(run, saved, data, fsdp, devices):
    assert any(s.spec != P() for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, run.state)))
    mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[devices])
    target = target_on(run, mesh)
    with checkpoint.Checkpointer(saved, SYNC) as ckpt:
        _, state, _, _ = ckpt.restore(target)
    assert_identical(state, run.state)
    assert_sharded_like(state, target)


def test_2_device_checkpoint_restores_on_8_devices(run, tmp_path):
    small = moved(run.state, target_on(run, parallel.make_mesh(1, 2, devices=jax.devices()[:2])))
    save_steps(tmp_path, small, run.cfg, [5])
    target = target_on(run, parallel.make_mesh(8, 1))
    with checkpoint.Checkpointer(tmp_path, SYNC) as ckpt:
        _, state, _, _ = ckpt.restore(target)
    assert_identical(state, run.state)
    assert_sharded_like(state, target)


def test_state_without_ema_round_trips(run, tmp_path):
    cfg = load_config("tiny", [*OVERRIDES, "train.ema_decay=0"])
    abstract = jax.eval_shape(lambda key: init_state(cfg, run.modules, key), jax.random.key(0))
    assert abstract.ema is None
    target = target_on(run, parallel.make_mesh(devices=jax.devices()[:1]), abstract)  # 1 device: quicker
    state = moved(run.state.replace(ema=None), target)
    save_steps(tmp_path, state, cfg, [3])
    with checkpoint.Checkpointer(tmp_path, SYNC) as ckpt:
        _, restored, _, config = ckpt.restore(target)
    assert restored.ema is None and config["train"]["ema_decay"] == 0
    assert_identical(restored, state)


def test_half_written_step_is_ignored_and_replaced(run, saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    # What a save of step 8 killed mid-write leaves: Orbax's tmp directory, before the rename.
    directory = tmp_path / "checkpoints"
    partial = directory / "8.orbax-checkpoint-tmp"
    shutil.copytree(directory / "7", partial)
    for marker in partial.rglob("commit_success.txt"):
        marker.unlink()
    target = target_on(run, parallel.make_mesh(devices=jax.devices()[:1]))  # 1 device: quicker
    state = scrambled(moved(run.state, target), seed=8)
    with checkpoint.Checkpointer(tmp_path, SYNC) as ckpt:
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
        # the resumed run reaches step 8 again: the leftover must not get in the way
        assert ckpt.save(8, state, DATA_STATE, run.cfg)
        step, restored, _, _ = ckpt.restore(target)
    assert step == 8 and not partial.exists()
    assert_identical(restored, state)


def test_another_model_config_is_explained(run, saved):
    cfg = load_config("tiny", [*OVERRIDES, "model.ch=16"])
    abstract = jax.eval_shape(lambda key: init_state(cfg, build_structure(cfg), key), jax.random.key(0))
    with checkpoint.Checkpointer(saved, SYNC) as ckpt:
        message = r"(?s)step 7 in .*checkpoints does not match.*another shape.*fresh workdir"
        with pytest.raises(ValueError, match=message):
            ckpt.restore(target_on(run, run.mesh, abstract))
        # a checkpoint with an EMA restored into a state without one
        with pytest.raises(ValueError, match=r"in the checkpoint but not expected:\s+ema/"):
            ckpt.restore(target_on(run, run.mesh, run.abstract.replace(ema=None)))


def test_missing_steps_are_listed(run, saved, tmp_path):
    with checkpoint.Checkpointer(tmp_path / "empty", SYNC) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty"):
            ckpt.restore(target_on(run, run.mesh))
    with checkpoint.Checkpointer(saved, SYNC) as ckpt:
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*available steps: \[7\]"):
            ckpt.restore(target_on(run, run.mesh), step=5)


def test_generic_pytree_and_forced_save_of_an_older_step(tmp_path):
    # int keys whose string order differs from their numeric order, a None, a typed key
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {"a": {2: np.float32(1), 10: np.arange(3.0)}, "none": None, "key": jax.random.key(3)}
    tree = jax.device_put(tree, sharding)
    with checkpoint.Checkpointer(tmp_path, SYNC) as ckpt:
        assert ckpt.save(3, tree, {}, load_config("tiny"))
        assert not ckpt.save(1, tree, {}, load_config("tiny"))
        assert ckpt.save(1, tree, {}, load_config("tiny"), force=True)
        assert ckpt.all_steps() == [1, 3] and ckpt.latest_step() == 3
        step, restored, _, _ = ckpt.restore(tree)  # live arrays serve as the abstract state too
    assert step == 3
    assert_identical(restored, tree)


def test_bad_inputs_are_explained(run, tmp_path):
    with checkpoint.Checkpointer(tmp_path, SYNC) as ckpt:
        with pytest.raises(TypeError, match="data_state must be JSON-serialisable"):
            ckpt.save(1, run.state, {"rng": np.zeros(2)}, run.cfg)
        with pytest.raises(ValueError, match=r"leaf .*step.* has no sharding.*with_shardings"):
            ckpt.restore(run.abstract)
        assert ckpt.all_steps() == []


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
def test_export_params_loads_with_sigmavae_jax_load(run, tmp_path, ema):
    path = checkpoint.export_params(tmp_path / "export", run.state, run.cfg, ema=ema)
    codec = sigmavae_jax.load(path)
    want = run.state.ema if ema else run.state.params["vae"]
    assert_identical(nnx.to_pure_dict(codec.params), jax.tree.map(np.asarray, want))
    assert codec.config == run.cfg


def test_export_of_missing_ema_is_explained(run, tmp_path):
    with pytest.raises(ValueError, match="keeps no EMA.*ema=False"):
        checkpoint.export_params(tmp_path / "export", run.state.replace(ema=None), run.cfg, ema=True)


def test_damaged_exports_are_named_as_such(run, tmp_path):
    """A missing path, a config that is not YAML, a params folder without its metadata, and
    arrays whose data files are gone: each one ValueError or FileNotFoundError in words."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_params(tmp_path / "nowhere")
    damage = {
        "config": lambda path: (path / checkpoint.CONFIG_FILE).write_text("model: [unclosed"),
        "metadata": lambda path: [p.unlink() for p in (path / checkpoint.PARAMS_DIR).glob("_*METADATA")],
        # the metadata is whole, the arrays' data files are gone: the restore itself fails
        "arrays": lambda path: [
            chunk.unlink() for chunk in (path / checkpoint.PARAMS_DIR).glob("ocdbt.process_*/d/*") if chunk.is_file()
        ],
    }
    for name, make in damage.items():
        path = checkpoint.export_params(tmp_path / name, run.state, run.cfg, ema=False)
        make(path)
        with pytest.raises(ValueError, match="a damaged export; copy the export again") as raised:
            checkpoint.load_params(path)
        assert name != "arrays" or "could not be read" in str(raised.value)


def test_reads_abandoned_by_a_failed_restore_are_not_reported(run, tmp_path):
    """One failed read ends Orbax's restore and closes its event loop while tensorstore finishes
    the other reads; each used to be reported as an unraisable 'Event loop is closed', a
    traceback per array, after the error and for seconds. In a fresh process: the error alone,
    and other unraisable exceptions still reported."""
    path = checkpoint.export_params(tmp_path / "export", run.state, run.cfg, ema=False)
    for chunk in (path / checkpoint.PARAMS_DIR).glob("ocdbt.process_*/d/*"):
        chunk.unlink()
    script = (
        "import sys, time\n"
        "from sigmavae_jax import checkpoint\n"
        "try:\n"
        f"    checkpoint.load_params({str(path)!r})\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "time.sleep(3)  # the abandoned reads finish on tensorstore's threads\n"
        "class Other:\n"
        "    def __del__(self):\n"
        "        raise RuntimeError('another unraisable')\n"
        "Other()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "could not be read" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "Event loop is closed" not in done.stderr and "another unraisable" in done.stderr
