"""TPU slices and GPU nodes by name: each chip's datasheet figures, and the devices to compile for.

A TPU slice is named as JAX does (`v5e:4x4`, `v4:2x2x4`) or as Cloud accelerator types are
(`v5litepod-16`, `v4-32`, `v5p-8`, `v6e-8`); GPUs by model (`h100`, `h200`, `a100-80gb`,
`b200`), one node of N as `8xh100` and M nodes of N as `2x8xh100`. `slice_devices` describes
the devices on any host, without the hardware and without `jax.distributed`: TPU chips through
libtpu (`pip install -e '.[tpu]'`), GPUs through the CUDA compiler plugin (`pip install -e
'.[gpu]'`) and the device description in `sigmavae_jax/gpu_targets/`. A program compiled for
them is the one the devices run. A GPU compile needs no GPU and no CUDA library installed.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's datasheet figures, per chip (a TPU chip or one GPU).

    bf16_flops: peak dense bf16 FLOP/s (no sparsity). hbm_bytes: HBM capacity (for a GPU, the
    memory CUDA reports, which the device description in gpu_targets/ holds too).
    hbm_bandwidth: HBM bytes/s. platform: "tpu" or "gpu".
    TPU only: cores: TensorCores per chip (Cloud's v4 and v5p names count cores, not chips);
    megacore: whether JAX sees a chip's two cores as one device; dims: 3 for the 3D-torus
    generations, 2 for the 2D ones; cloud_prefix: the accelerator type's prefix
    (v5litepod-16 -> "v5litepod").
    """

    name: str
    bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    cores: int = 1
    megacore: bool = False
    dims: int = 2
    cloud_prefix: str = ""
    platform: str = "tpu"

    @property
    def unit(self) -> str:
        """What one device is called in reports: "chip" or "GPU"."""
        return "GPU" if self.platform == "gpu" else "chip"


# TPUs: Cloud TPU system architecture pages. GPUs: NVIDIA's datasheets (SXM parts; B200 as in
# HGX B200), dense bf16 tensor-core peaks, HBM bandwidth; capacity as CUDA reports it.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, cores=2, megacore=True, dims=3, cloud_prefix="v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, cores=1, megacore=False, dims=2, cloud_prefix="v5litepod"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, cores=2, megacore=True, dims=3, cloud_prefix="v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, cores=1, megacore=False, dims=2, cloud_prefix="v6e"),
    "a100-80gb": Chip("NVIDIA A100 80GB", 312e12, 85_100_068_864, 2039e9, platform="gpu"),
    "h100": Chip("NVIDIA H100 80GB", 989e12, 84_942_979_072, 3350e9, platform="gpu"),
    "h200": Chip("NVIDIA H200 141GB", 989e12, 151_397_597_184, 4800e9, platform="gpu"),
    "b200": Chip("NVIDIA B200", 2250e12, 191_514_411_008, 8000e9, platform="gpu"),
}
TPUS = {key: chip for key, chip in CHIPS.items() if chip.platform == "tpu"}
GPUS = {key: chip for key, chip in CHIPS.items() if chip.platform == "gpu"}
GPUS_PER_NODE = 8  # the most GPUs a node name may hold (8xh100); more are more nodes (2x8xh100)

# JAX's GPU allocator takes this fraction of a GPU's memory unless XLA_CLIENT_MEM_FRACTION
# (or the older XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise (jaxlib's xla_client).
GPU_MEMORY_FRACTION = 0.75

# Chips per host: 4 (2x2x1) on multi-host slices; single-host 2D slices hold up to 8 (2x4).
HOST_BOUNDS = (2, 2, 1)
SINGLE_HOST_2D = {(1, 1): (1, 1, 1), (2, 2): (2, 2, 1), (2, 4): (2, 4, 1)}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice or a set of GPU nodes: its chip, grid, hosts, and the name it was asked for by."""

    name: str  # as given
    generation: str  # a key of CHIPS
    shape: tuple[int, ...]  # TPU: chips along each axis, e.g. (4, 4) or (2, 2, 4); GPU: (nodes, GPUs per node)

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """The canonical name: JAX's for a TPU slice ("v5e:4x4"); "h100", "8xh100" or "2x8xh100"."""
        if self.chip.platform == "gpu":
            nodes, per_node = self.shape
            if nodes > 1:
                return f"{nodes}x{per_node}x{self.generation}"
            return f"{per_node}x{self.generation}" if per_node > 1 else self.generation
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def capacity(self) -> int:
        """The bytes a program may use on one device: a TPU chip's HBM; for a GPU, the share of
        its memory JAX's allocator takes (`gpu_memory_fraction`)."""
        if self.chip.platform == "gpu":
            return int(self.chip.hbm_bytes * gpu_memory_fraction())
        return self.chip.hbm_bytes

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        if self.chip.dims == 2 and self.shape in SINGLE_HOST_2D:
            return SINGLE_HOST_2D[self.shape]
        return HOST_BOUNDS

    @property
    def hosts(self) -> int:
        if self.chip.platform == "gpu":
            return self.shape[0]
        bounds = self.host_bounds
        return math.prod(s // b for s, b in zip((*self.shape, 1)[:3], bounds))


def _cloud_shapes(chip: Chip) -> dict[str, tuple[int, ...]]:
    """Cloud accelerator type -> chip grid: v4/v5p count TensorCores (v4-32 is 16 chips,
    2x2x4); v5litepod/v6e count chips (v5litepod-16 is 4x4)."""
    if chip.dims == 3:
        grids = [
            (2, 2, 1),
            (2, 2, 2),
            (2, 2, 4),
            (2, 4, 4),
            (4, 4, 4),
            (4, 4, 8),
            (4, 8, 8),
            (8, 8, 8),
            (8, 8, 16),
            (8, 16, 16),
        ]
    else:
        grids = [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]
    return {f"{chip.cloud_prefix}-{math.prod(g) * chip.cores}": g for g in grids}


def known_names() -> list[str]:
    """Every Cloud accelerator type this module knows, the JAX form of each TPU generation, then
    each GPU and the node forms."""
    names = [name for chip in TPUS.values() for name in _cloud_shapes(chip)]
    names += [f"{generation}:AxB{'xC' if chip.dims == 3 else ''}" for generation, chip in TPUS.items()]
    return names + list(GPUS) + [f"8xh100 (one node of 1 to {GPUS_PER_NODE} GPUs)", "2x8xh100 (2 nodes of 8)"]


class UnknownTopology(ValueError):
    """A name that names no TPU slice or GPU this module knows."""


_GPU_NAME = re.compile(r"(?:(\d+)x)?(?:(\d+)x)?([a-z][a-z0-9\-]*)")


def _parse_gpus(name: str, text: str) -> Slice | None:
    """`h100`, `8xh100`, `2x8xh100` -> a Slice; None when `text` names no GPU model."""
    match = _GPU_NAME.fullmatch(text)
    if not match or match.group(3) not in GPUS:
        return None
    first, second, model = match.groups()
    nodes, per_node = (int(first), int(second)) if second else (1, int(first or 1))
    if not (nodes >= 1 and 1 <= per_node <= GPUS_PER_NODE):
        raise UnknownTopology(
            f"topology {name!r}: a node holds 1 to {GPUS_PER_NODE} GPUs and there is at least one "
            f"node; name more GPUs as nodes, e.g. 2x8x{model}"
        )
    return Slice(name, model, (nodes, per_node))


def parse_slice(name: str) -> Slice:
    """`v5e:4x4`, `v4:2x2x4`, `v5litepod-16`, `v4-32`, `h100`, `8xh100`, `2x8xh100`, ... -> a Slice.

    Raises UnknownTopology (one line, listing the known names) for anything else.
    """
    text = name.strip().lower()
    gpus = _parse_gpus(name, text)
    if gpus is not None:
        return gpus
    for generation, chip in TPUS.items():
        shape = _cloud_shapes(chip).get(text)
        if shape is not None:
            return Slice(name, generation, shape)
    match = re.fullmatch(r"(v\d+[a-z]*)[:=_](\d+(?:x\d+)*)", text)
    if match and match.group(1) in TPUS:
        generation = match.group(1)
        shape = tuple(int(d) for d in match.group(2).split("x"))
        dims = CHIPS[generation].dims
        if len(shape) == dims and all(s > 0 for s in shape):
            bounds = Slice(name, generation, shape).host_bounds
            if all(s % b == 0 for s, b in zip((*shape, 1)[:3], bounds)):
                return Slice(name, generation, shape)
            raise UnknownTopology(
                f"topology {name!r}: {dims}D {generation} slices are whole hosts of "
                f"{'x'.join(map(str, bounds[:dims]))} chips (or 1x1, 2x2, 2x4 on one host); e.g. {generation}:4x4"
            )
        raise UnknownTopology(
            f"topology {name!r}: {generation} slices have {dims} dimensions, e.g. "
            f"{generation}:{'2x2x1' if dims == 3 else '2x2'}"
        )
    raise UnknownTopology(f"unknown topology {name!r}; known: {', '.join(known_names())}")


def gpu_memory_fraction() -> float:
    """The fraction of a GPU's memory JAX's allocator takes, read as JAX reads it in a run:
    XLA_CLIENT_MEM_FRACTION, else XLA_PYTHON_CLIENT_MEM_FRACTION, else GPU_MEMORY_FRACTION.
    Raises ConfigError for a value that is not a fraction in (0, 1]."""
    from sigmavae_jax.config import ConfigError

    for variable in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        text = os.environ.get(variable, "").strip()
        if text:
            try:
                fraction = float(text)
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise ConfigError(f"{variable}={text!r} is not a fraction of the GPU's memory in (0, 1]; use e.g. 0.9")
            return fraction
    return GPU_MEMORY_FRACTION


def gpu_target_config(model: str) -> str:
    """The device description of GPU `model` (a key of GPUS) as the CUDA compiler takes it: a
    GpuTargetConfigProto in text form, from sigmavae_jax/gpu_targets/MODEL.txtpb."""
    return importlib.resources.files("sigmavae_jax").joinpath("gpu_targets", f"{model}.txtpb").read_text()


def compile_only_environment() -> None:
    """Settings for a process that compiles for slices and runs nothing on them: JAX computes
    on the CPU (a TPU VM's own chips or a GPU machine's GPUs stay free for the job that uses
    them), libtpu may be loaded beside other processes that hold it, and it prints no errors
    about a local TPU. Call before JAX starts; set variables win."""
    platforms = os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not _asks_for_tpu(platforms):
        # what libtpu compiles for a described slice does not depend on these (the same
        # program, checked)
        _name_a_tpu_host_for_libtpu()


# Where a TPU VM's chips appear: /dev/accel* (TPU v2 to v5e) and /dev/vfio (v5p, v6e).
_TPU_DEVICE_NODES = ("/dev/accel*", "/dev/vfio")


def quiet_libtpu_on_a_host_without_tpu() -> None:
    """For a process that runs on this host's devices (train.py, eval.py, the demo): on a host
    with no TPU device nodes, libtpu (which the [tpu] and [test] extras install) still starts
    when JAX looks for a TPU and prints errors about the local TPU it cannot describe; with the
    dry run's settings it finds no TPU quietly, and JAX goes on with the CPU or GPUs. A host
    with TPU device nodes, a process told to use a TPU, and variables already set are left
    alone. Call before JAX starts."""
    if _asks_for_tpu(os.environ.get("JAX_PLATFORMS", "")):
        return
    if any(glob.glob(pattern) for pattern in _TPU_DEVICE_NODES):
        return
    _name_a_tpu_host_for_libtpu()


def _asks_for_tpu(platforms: str) -> bool:
    """Whether a JAX_PLATFORMS value asks for this host's TPU, which libtpu must find as it is."""
    return "tpu" in platforms.lower().split(",")


def _name_a_tpu_host_for_libtpu() -> None:
    # libtpu looks for the local TPU's type and its hosts' names and, finding none, prints
    # errors ("unexpected worker hostname"); naming any one host keeps it quiet
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _gpu_devices(gpus: Slice) -> list:
    """The GPUs' devices, described by the CUDA compiler plugin from the packaged description:
    one process per node, as a run launches them."""
    from jax.experimental import topologies

    nodes, per_node = gpus.shape
    try:
        description = topologies.get_topology_desc(
            gpus.generation, "cuda", target_config=gpu_target_config(gpus.generation), topology=f"1x{nodes}x{per_node}"
        )
    except NotImplementedError:  # what JAX raises when no plugin registered the platform
        raise RuntimeError(
            f"cannot describe GPUs {gpus.topology} on this host (no CUDA compiler plugin); install it with "
            "pip install -e '.[gpu]' (jax-cuda12-plugin matching this jax; no GPU or CUDA libraries needed)"
        ) from None
    except Exception as error:  # a plugin that cannot read the description
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(
            f"cannot describe GPUs {gpus.topology} on this host ({message}); reinstall the "
            "CUDA compiler plugin matching this jax with pip install -e '.[gpu]'"
        ) from None
    return list(description.devices)


def slice_devices(tpu_slice: Slice) -> list:
    """The slice's devices (one per TPU chip, megacore where the chip has it; one per GPU),
    described on this host by libtpu or the CUDA compiler plugin. Raises RuntimeError naming
    the extra to install when that is missing."""
    from jax.experimental import topologies

    if tpu_slice.chip.platform == "gpu":
        return _gpu_devices(tpu_slice)
    chip = tpu_slice.chip
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=tpu_slice.topology,
            chip_config_name="megacore" if chip.megacore else "default",
            chips_per_host_bounds=tpu_slice.host_bounds,
            num_slices=1,
            wrap=(False, False, False),
        )
    except Exception as error:  # libtpu missing, or one that cannot describe this generation
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(
            f"cannot describe TPU slice {tpu_slice.topology} on this host ({message}); "
            "install the TPU compiler with pip install -e '.[tpu]' (jax[tpu] matching this jax)"
        ) from None
    return list(description.devices)
