"""Device mesh (data, fsdp), the shardings of batches and parameters, and global batches
assembled from per-process arrays. Knows nothing of models."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sigmavae_jax.config import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all). data=-1: all devices / fsdp.

    Raises ConfigError, naming `train.mesh_fsdp` / `train.mesh_data` and the values that fit
    the devices, when the two do not multiply to the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    if fsdp <= 0 or n % fsdp:
        raise ConfigError(f"train.mesh_fsdp={fsdp} must divide the {n} devices; use one of {divisors}")
    if data == -1:
        data = n // fsdp
    if data <= 0 or data * fsdp != n:
        raise ConfigError(
            f"train.mesh_data={data} x train.mesh_fsdp={fsdp} must equal the {n} devices; "
            f"use train.mesh_data=-1 (all devices / mesh_fsdp) or train.mesh_data={n // fsdp}"
        )
    return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises ConfigError unless `global_batch` splits evenly over the mesh's devices."""
    if global_batch % mesh.size:
        raise ConfigError(
            f"global batch size {global_batch} must be a multiple of the {mesh.size} devices; "
            f"use train.batch_size={max(mesh.size, global_batch // mesh.size * mesh.size)}"
        )


def param_sharding(mesh: Mesh, shape: tuple[int, ...], min_size: int) -> NamedSharding:
    """Replicated, unless the fsdp axis has several devices and the array has at least
    `min_size` elements: then its largest dimension divisible by the fsdp size is split."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, tree: Any, min_size: int) -> Any:
    """Shardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda leaf: param_sharding(mesh, tuple(leaf.shape), min_size), tree)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of the batch -> one global array sharded over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed.initialize: explicit (coordinator, count, id) or auto-detected (TPU
    pods, SLURM, ...). CPU collectives across processes go through gloo (this setting only
    concerns the CPU backend, so it is harmless on GPU and TPU hosts). Returns once every
    process has joined and one collective has run across all of them. Raises ConfigError when
    auto-detection finds no cluster (--multihost on a machine that is not part of one)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except ValueError as error:
        if coordinator is not None:
            raise
        raise ConfigError(
            f"--multihost found no cluster to join (JAX: {str(error).rstrip('.')}). It is for TPU VM pod "
            "slices, SLURM and the other launchers JAX detects; elsewhere give --coordinator HOST:PORT "
            "--num-processes N --process-id I to every process, or leave --multihost out to run one process"
        ) from None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Gloo connects the processes on their first collective and gives up after 30 s; run
        # it now, while they are in step (initialize returns when all have joined), rather
        # than after setup work (compiles, data) that one of them may finish much later.
        multihost_utils.sync_global_devices("sigmavae_jax: processes joined")


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (on every process)."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
