"""TPU slices by name: each chip's datasheet figures, and the devices of a slice to compile for.

A slice is named as JAX does (`v5e:4x4`, `v4:2x2x4`) or as Cloud accelerator types are
(`v5litepod-16`, `v4-32`, `v5p-8`, `v6e-8`). `slice_devices` describes its chips through
libtpu (`pip install -e '.[tpu]'`) on any host, TPU or not, without `jax.distributed`:
a program compiled for them is the one the slice runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's datasheet figures, per chip (Cloud TPU system architecture pages).

    bf16_flops: peak bf16 FLOP/s. hbm_bytes: HBM capacity. hbm_bandwidth: HBM bytes/s.
    cores: TensorCores per chip (Cloud's v4 and v5p names count cores, not chips).
    megacore: whether JAX sees a chip's two cores as one device.
    dims: 3 for the 3D-torus generations, 2 for the 2D ones.
    """

    name: str
    bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    cores: int
    megacore: bool
    dims: int
    cloud_prefix: str  # the accelerator type's prefix: v5litepod-16 -> "v5litepod"


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, cores=2, megacore=True, dims=3, cloud_prefix="v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, cores=1, megacore=False, dims=2, cloud_prefix="v5litepod"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, cores=2, megacore=True, dims=3, cloud_prefix="v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, cores=1, megacore=False, dims=2, cloud_prefix="v6e"),
}

# Chips per host: 4 (2x2x1) on multi-host slices; single-host 2D slices hold up to 8 (2x4).
HOST_BOUNDS = (2, 2, 1)
SINGLE_HOST_2D = {(1, 1): (1, 1, 1), (2, 2): (2, 2, 1), (2, 4): (2, 4, 1)}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its generation, chip grid, hosts, and the name it was asked for by."""

    name: str  # as given
    generation: str  # a key of CHIPS
    shape: tuple[int, ...]  # chips along each axis, e.g. (4, 4) or (2, 2, 4)

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """JAX's name: "v5e:4x4"."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        if self.chip.dims == 2 and self.shape in SINGLE_HOST_2D:
            return SINGLE_HOST_2D[self.shape]
        return HOST_BOUNDS

    @property
    def hosts(self) -> int:
        bounds = self.host_bounds
        return math.prod(s // b for s, b in zip((*self.shape, 1)[:3], bounds))


def _cloud_shapes(chip: Chip) -> dict[str, tuple[int, ...]]:
    """Cloud accelerator type -> chip grid: v4/v5p count TensorCores (v4-32 is 16 chips,
    2x2x4); v5litepod/v6e count chips (v5litepod-16 is 4x4)."""
    if chip.dims == 3:
        grids = [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8), (8, 8, 16),
                 (8, 16, 16)]
    else:
        grids = [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]
    return {f"{chip.cloud_prefix}-{math.prod(g) * chip.cores}": g for g in grids}


def known_names() -> list[str]:
    """Every Cloud accelerator type this module knows, then the JAX form of each generation."""
    names = [name for chip in CHIPS.values() for name in _cloud_shapes(chip)]
    return names + [f"{generation}:AxB{'xC' if chip.dims == 3 else ''}" for generation, chip in CHIPS.items()]


class UnknownTopology(ValueError):
    """A slice name that names no TPU slice this module knows."""


def parse_slice(name: str) -> Slice:
    """`v5e:4x4`, `v4:2x2x4`, `v5litepod-16`, `v4-32`, ... -> a Slice.

    Raises UnknownTopology (one line, listing the known names) for anything else.
    """
    text = name.strip().lower()
    for generation, chip in CHIPS.items():
        shape = _cloud_shapes(chip).get(text)
        if shape is not None:
            return Slice(name, generation, shape)
    match = re.fullmatch(r"(v\d+[a-z]*)[:=_](\d+(?:x\d+)*)", text)
    if match and match.group(1) in CHIPS:
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
        raise UnknownTopology(f"topology {name!r}: {generation} slices have {dims} dimensions, e.g. "
                              f"{generation}:{'2x2x1' if dims == 3 else '2x2'}")
    raise UnknownTopology(f"unknown TPU topology {name!r}; known: {', '.join(known_names())}")


def compile_only_environment() -> None:
    """Settings for a process that compiles for slices and runs nothing on them: JAX computes
    on the CPU (a TPU VM's own chips stay free for the job that uses them), and libtpu may be
    loaded beside other processes that hold it. Call before JAX starts; set variables win."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def slice_devices(tpu_slice: Slice) -> list:
    """The slice's devices (one per chip, megacore where the chip has it), described by libtpu
    on this host. Raises RuntimeError naming the extra to install when libtpu is missing."""
    from jax.experimental import topologies

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
