"""Shared test fixtures: tiny model configs and deterministic inputs.

Every test process sees 8 simulated CPU devices (set before jax is imported), so the
multi-device tests run beside the rest; single-device code keeps using device 0.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

# Tests run on the CPU and compile for TPU slices beside each other (libtpu is installed by the
# test extra): the settings of a compile-only process.
from sigmavae_jax.topology import compile_only_environment  # noqa: E402

compile_only_environment()

# gcsfs's experimental bucket-type probe talks to the Storage Control gRPC API, which the local
# Cloud Storage emulator does not serve; gcsfs reads this switch once, when first imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Tests compile the same functions more than once (fresh closures, several tests): a
# session-wide persistent cache turns the repeats into cache hits. It grows to ~0.5 GB per
# run, so it goes when the run ends.
_compilation_cache = tempfile.mkdtemp(prefix="sigmavae_jax_cache_")
atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _compilation_cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
import pytest  # noqa: E402

from sigmavae_jax.config import ModelConfig  # noqa: E402

# `make test` hands whole files to two workers in collection order (`--dist loadfile
# --no-loadscope-reorder`). The files that take longest on the 2-core CI machine go first, so
# that none of them starts late and runs alone while the other worker sits idle.
LONGEST_FILES_FIRST = (
    "test_train_step.py",
    "test_train_loop.py",
    "test_gpu_dry_run.py",
    "test_dry_run.py",
    "test_evaluate.py",
    "test_train_gcs.py",
    "test_eval_multihost.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """An SD-like f4 model small enough for many CPU forward passes."""
    return ModelConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8)


def images(shape, seed=0) -> np.ndarray:
    """Uniform [-1, 1] float32 images of `shape` (B, H, W, C)."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def photo_folder_with_tiny_export(root, count: int):
    """`count` small random-colour photos of varied sizes in `root` and a tiny random model's
    params export beside them -> (export path, a config whose data section reads the folder)."""
    from PIL import Image

    from sigmavae_jax import api, checkpoint
    from sigmavae_jax.config import Config, load_config

    rng = np.random.default_rng(1)
    for i in range(count):
        small = rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8)
        Image.fromarray(small).resize((40 + 3 * i, 36), Image.BICUBIC).save(root / f"{i:02d}.png")
    model_cfg = load_config("tiny").model
    export = checkpoint.save_params(
        root / "export", api.params_of(api.build_model(model_cfg, seed=2)), Config(model=model_cfg)
    )
    return export, load_config(None, [f"data.path={root}"])


@pytest.fixture(scope="session")
def gcs():
    """A Cloud Storage API on localhost (fake-gcs-server), with the standard endpoint variables
    pointing this process's clients at it for the rest of the session (gcsfs caches its
    filesystem object, so one emulator serves every in-process test). Subprocesses get the same
    variables from `gcs.environment()`. Stopped when the session ends."""
    from gcs_emulator import Emulator

    emulator = Emulator().start()
    os.environ.update(emulator.environment())
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth random colour images (plus two broken files) in a folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        small = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((48 + 4 * i, 40), Image.BICUBIC).save(root / f"img_{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    good = (root / "img_00.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root
