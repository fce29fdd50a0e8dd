"""Compile a program for a TPU slice or GPUs on this host, without the devices, weights or data,
and say what each device would hold and do: HBM by part against the device's capacity, FLOPs
and HBM bytes per image, and the roofline-bound images/s.

For a TPU, FLOPs and bytes are the compiled program's own cost analysis. The GPU compiler gives
no cost analysis: FLOPs then come from XLA's analysis of the same program lowered (not
compiled) for one CPU device at the same per-device batch with the GPU's kernels, and there is
no bytes figure, so a GPU's roofline is its compute roofline alone.

`train_step_report` compiles the training step exactly as `train.py` builds it (same mesh
rules, shardings, kernels, LPIPS, discriminator, EMA, remat and dtype); `codec_reports`
compiles encode and decode as `eval.py` and `sigmavae_jax.load` run them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable

import jax
import numpy as np

from sigmavae_jax import api, parallel, topology
from sigmavae_jax.config import Config, ModelConfig, with_overrides
from sigmavae_jax.kernels import Kernels, select
from sigmavae_jax.topology import GiB, Slice
from sigmavae_jax.train.program import build_program

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFit(RuntimeError):
    """The compiler refused the program: it needs more HBM than a chip has. `used` (the whole
    program) or `temporaries` in bytes, when the compiler's message gives them."""

    def __init__(self, message: str, *, used: int | None = None, temporaries: int | None = None):
        super().__init__(message)
        self.used, self.temporaries = used, temporaries


# How XLA:TPU words an out-of-memory compile: the whole program, or its temporaries alone.
_USED = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm")
_TEMPORARIES = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM")


def per_device_bytes(tree: Any) -> int:
    """Bytes of one device's shard of every array leaf of `tree` (ShapeDtypeStructs or arrays
    with shardings; a leaf without one counts whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # a key is its key data: uint32 words
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            shape, dtype = (*shape, *data.shape[len(leaf.shape) :]), data.dtype
        else:
            dtype = leaf.dtype
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def _bytes_of(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit.upper()])


def compile_for_slice(jitted, args: tuple) -> tuple[Any, float]:
    """(compiled program, compile seconds) of `jitted` at abstract `args`.

    Raises DoesNotFit when the compiler runs out of HBM.
    """
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as error:  # XlaRuntimeError; its type moves between jax versions
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        used, temporaries = _USED.search(text), _TEMPORARIES.search(text)
        first = next((line for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
        raise DoesNotFit(
            first.strip(),
            used=_bytes_of(*used.group(1, 2)) if used else None,
            temporaries=_bytes_of(*temporaries.group(1, 2)) if temporaries else None,
        ) from None
    return compiled, time.perf_counter() - start


def cost_of(program) -> dict[str, float]:
    """A compiled (or lowered) program's cost analysis (per device): {"flops", "bytes accessed",
    ...}; empty when the compiler gives none (XLA:GPU)."""
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return dict(cost or {})


# The least images per chip whose convs the TPU compiler takes as they are laid out (v4, v5e, v5p
# and v6e alike); with fewer it folds image columns into the batch around each conv.
TPU_FULL_BATCH = 8

# Where a report's FLOPs come from, as its text and JSON say.
COMPILED = "the compiled program's cost analysis"
LOWERED_ON_CPU = (
    "XLA's count of the same program lowered for one CPU device, with the same kernels and batch "
    "per device; the GPU compiler counts none"
)


def one_cpu_mesh():
    """A (data, fsdp) mesh of this host's first CPU device."""
    return parallel.make_mesh(1, 1, devices=jax.devices("cpu")[:1])


def lowered_flops(jitted, args: tuple) -> float:
    """FLOPs of `jitted` at `args` from XLA's analysis of the lowered, unoptimised program (no
    compile). Its byte count is not HBM traffic (nothing is fused yet), so only FLOPs are read."""
    return float(cost_of(jitted.lower(*args)).get("flops", 0.0))


def step_flops_on_one_cpu(cfg: Config, per_device: int, kernels: Kernels) -> float:
    """FLOPs of one device's training step of `cfg` at `per_device` images, with `kernels`:
    the step built for one CPU device (mesh 1 x 1) and lowered, not compiled. Replicated
    parameters, so the optimizer and EMA updates count whole, as on each data-parallel device."""
    one = with_overrides(
        cfg,
        [f"train.batch_size={per_device}", "train.mesh_data=1", "train.mesh_fsdp=1", f"train.kernels={kernels.name}"],
    )
    program = build_program(one, one_cpu_mesh(), abstract=True)
    return lowered_flops(program.step, program.abstract_arguments())


@dataclasses.dataclass
class Report:
    """What one device (TPU chip or GPU) holds and does for one compiled program (bytes are per
    device).

    arguments: the program's inputs by part (parameters, optimizer state, ...), their logical
    sizes. allocated_arguments (the inputs as the device lays them out, small arrays padded to
    whole tiles), temporaries, outputs, aliased (outputs written in place of donated inputs)
    and code come from the compiled program's memory analysis and are None when the compiler
    refused the program; total is then the compiler's own figure, or the arguments and the
    temporaries it names. fits: total within the slice's `capacity`. FLOPs and bytes per image
    are the program's cost over the images each device computes, from `flops_source`; bytes are
    None where no analysis gives them (GPU), FLOPs None when not asked for (flops=False on GPU).
    """

    program: str
    tpu_slice: Slice
    batch_per_chip: int
    arguments: dict[str, int]
    total: int
    fits: bool
    allocated_arguments: int | None = None
    temporaries: int | None = None
    outputs: int | None = None
    aliased: int | None = None
    code: int | None = None
    flops_per_image: float | None = None
    bytes_per_image: float | None = None
    compile_s: float = 0.0
    refusal: str | None = None
    flops_source: str = COMPILED
    kernels: str | None = None  # the name of the Kernels the program was built with

    @property
    def hbm(self) -> int:
        """What the program may use on one device (`Slice.capacity`)."""
        return self.tpu_slice.capacity

    @property
    def roofline_images_per_s(self) -> float | None:
        """The lesser of peak bf16 FLOP/s / FLOPs per image and HBM bandwidth / bytes per image;
        without a bytes figure (GPU), the compute term alone: an upper bound."""
        if not self.flops_per_image:
            return None
        chip = self.tpu_slice.chip
        compute = chip.bf16_flops / self.flops_per_image
        if not self.bytes_per_image:
            return compute
        return min(compute, chip.hbm_bandwidth / self.bytes_per_image)

    @property
    def bound(self) -> str | None:
        """ "compute" or "memory"; "compute only" when there is no bytes figure to compare."""
        if not self.flops_per_image:
            return None
        if not self.bytes_per_image:
            return "compute only"
        chip = self.tpu_slice.chip
        return (
            "compute"
            if chip.bf16_flops / self.flops_per_image <= chip.hbm_bandwidth / self.bytes_per_image
            else "memory"
        )

    def lines(self) -> list[str]:
        """The report as text, one figure a line."""
        s, chip = self.tpu_slice, self.tpu_slice.chip
        unit = chip.unit
        gib = lambda n: f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        hosts = f"{s.hosts} {'node' if chip.platform == 'gpu' else 'host'}{'s' * (s.hosts > 1)}"
        lines = [
            f"{self.program} on {s.topology} ({s.name}: {s.chips} x {chip.name}, {hosts}), "
            f"{self.batch_per_chip} images per {unit}, compiled in {self.compile_s:.1f} s",
            f"HBM per {unit}:",
        ]
        lines += [f"  {'argument ' + name:<28} {gib(size)}" for name, size in self.arguments.items()]
        for name, size in (
            ("arguments as laid out", self.allocated_arguments),
            ("temporaries", self.temporaries),
            ("outputs", self.outputs),
            ("outputs in donated inputs", self.aliased),
            ("program code", self.code),
        ):
            if size is not None and (size or name == "temporaries"):
                lines.append(f"  {name:<28} {'-' if name.startswith('outputs in') else ''}{gib(size)}")
        verdict = "fits" if self.fits else "does not fit"
        lines.append(
            f"  {'total':<28} {gib(self.total)} of {gib(self.hbm)} ({100 * self.total / self.hbm:.0f}%): {verdict}"
        )
        if chip.platform == "gpu":
            lines.append(
                f"  ({gib(self.hbm)}: the {topology.gpu_memory_fraction():.0%} of the GPU's {gib(chip.hbm_bytes)} "
                "that JAX's allocator takes; XLA_CLIENT_MEM_FRACTION, set for the run and this dry run, changes it)"
            )
        if self.refusal:
            lines.append(f"  the compiler: {self.refusal}")
        if self.flops_per_image:
            rate = self.roofline_images_per_s
            flops = (
                f"{self.flops_per_image / 1e12:.3f} TFLOP"
                if self.flops_per_image >= 1e11
                else f"{self.flops_per_image / 1e9:.2f} GFLOP"
            )
            peaks = f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s"
            if self.bytes_per_image:
                lines.append(f"per image: {flops}, {self.bytes_per_image / 1e9:.3f} GB of HBM traffic")
                lines.append(f"roofline: {rate:.1f} images/s per {unit} ({self.bound}-bound; {peaks})")
                if chip.platform == "tpu" and self.batch_per_chip < TPU_FULL_BATCH:
                    lines.append(
                        f"  note: below {TPU_FULL_BATCH} images per chip the TPU compiler lays each conv's input out "
                        f"again (image columns folded into the batch: pads and copies around every conv), so the "
                        f"bytes per image are several times those at {TPU_FULL_BATCH} per chip "
                        "(docs/performance.md); compare at a larger batch"
                    )
            else:
                lines.append(f"per image: {flops} ({self.flops_source}); HBM traffic: no figure")
                lines.append(
                    f"roofline: {rate:.1f} images/s per {unit} at the compute peak alone ({peaks}): an upper "
                    "bound, since without a bytes figure the memory term is unknown"
                )
        return lines

    def figures(self) -> dict[str, Any]:
        """The report as a JSON-able dict; the same keys for TPUs and GPUs ("chip" is one device),
        and for GPUs also the device's memory and the fraction of it JAX takes."""
        chip = self.tpu_slice.chip
        gpu = {}
        if chip.platform == "gpu":
            gpu = {"device_memory": chip.hbm_bytes, "memory_fraction": topology.gpu_memory_fraction()}
        return {
            "program": self.program,
            "topology": self.tpu_slice.topology,
            "name": self.tpu_slice.name,
            "platform": chip.platform,
            "device": chip.name,
            **gpu,
            "kernels": self.kernels,
            "chips": self.tpu_slice.chips,
            "hosts": self.tpu_slice.hosts,
            "batch_per_chip": self.batch_per_chip,
            "hbm_arguments": self.arguments,
            "hbm_arguments_allocated": self.allocated_arguments,
            "hbm_temporaries": self.temporaries,
            "hbm_outputs": self.outputs,
            "hbm_aliased": self.aliased,
            "hbm_code": self.code,
            "hbm_total": self.total,
            "hbm_capacity": self.hbm,
            "fits": self.fits,
            "flops_per_image": self.flops_per_image,
            "bytes_per_image": self.bytes_per_image,
            "flops_source": self.flops_source if self.flops_per_image else None,
            "roofline_images_per_s_per_chip": self.roofline_images_per_s,
            "bound": self.bound,
            "compile_s": round(self.compile_s, 2),
        }


def report_of(
    program: str,
    tpu_slice: Slice,
    jitted,
    args: tuple,
    parts: dict[str, Any],
    batch_per_chip: int,
    keep: dict | None = None,
    flops: Callable[[], float] | None = None,
    kernels: str | None = None,
) -> Report:
    """Compiles `jitted` at `args` and reports it. parts: name -> the subtree of `args` it
    names, for the arguments' breakdown. keep: when given, gets the compiled program under
    "compiled" (for callers that read it further). flops: one device's FLOPs from elsewhere
    (`step_flops_on_one_cpu`), called when the compiled program gives no cost analysis.
    kernels: the name of the kernels the program was built with, for the report."""
    arguments = {name: per_device_bytes(tree) for name, tree in parts.items()}
    start = time.perf_counter()
    try:
        compiled, seconds = compile_for_slice(jitted, args)
    except DoesNotFit as refused:
        total = refused.used or sum(arguments.values()) + (refused.temporaries or 0)
        return Report(
            program,
            tpu_slice,
            batch_per_chip,
            arguments,
            total=total,
            fits=False,
            temporaries=refused.temporaries,
            compile_s=time.perf_counter() - start,
            refusal=str(refused),
            kernels=kernels,
        )
    if keep is not None:
        keep["compiled"] = compiled
    memory = compiled.memory_analysis()
    cost = cost_of(compiled)
    source = COMPILED
    if "flops" not in cost and flops is not None:
        cost, source = {"flops": flops()}, LOWERED_ON_CPU
    bytes_accessed = cost.get("bytes accessed")
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    return Report(
        program,
        tpu_slice,
        batch_per_chip,
        arguments,
        total=total,
        fits=total <= tpu_slice.capacity,
        allocated_arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        code=memory.generated_code_size_in_bytes,
        flops_per_image=cost["flops"] / batch_per_chip if "flops" in cost else None,
        bytes_per_image=None if bytes_accessed is None else bytes_accessed / batch_per_chip,
        compile_s=seconds,
        flops_source=source,
        kernels=kernels,
    )


def fill_step_flops(report: Report, cfg: Config) -> Report:
    """`report` (of the step of `cfg`, made with flops=False) with its FLOPs per image from
    `step_flops_on_one_cpu` with the report's kernels, when the compiled program gave none.
    Returns `report`."""
    if report.flops_per_image is None:
        devices = [] if report.kernels else topology.slice_devices(report.tpu_slice)
        kernels = select(report.kernels or cfg.train.kernels, devices)
        report.flops_per_image = step_flops_on_one_cpu(cfg, report.batch_per_chip, kernels) / report.batch_per_chip
        report.flops_source = LOWERED_ON_CPU
    return report


def slice_mesh(cfg: Config, tpu_slice: Slice):
    """The (data, fsdp) mesh a run of `cfg` builds on the slice's chips."""
    return parallel.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp, devices=topology.slice_devices(tpu_slice))


def train_step_report(cfg: Config, tpu_slice: Slice, keep: dict | None = None, *, flops: bool = True) -> Report:
    """The training step of `cfg` compiled for `tpu_slice` at cfg.train.batch_size (global).
    flops=False: no FLOPs where the compiled program gives none (GPU) instead of lowering the
    step once more for one CPU device: for a search that reads only memory.

    Raises ConfigError when the global batch does not split over the slice's chips, as a run does.
    """
    mesh = slice_mesh(cfg, tpu_slice)
    program = build_program(cfg, mesh, abstract=True)
    state, images, lpips = program.abstract_arguments()
    parts = {
        "parameters": state.params,
        "optimizer state": state.opt_state,
        "EMA": state.ema,
        "discriminator": (state.disc_params, state.disc_stats, state.disc_opt_state),
        "LPIPS": lpips,
        "images": images,
        "step and rng": (state.step, state.rng),
    }
    if keep is not None:
        keep["program"], keep["arguments"] = program, (state, images, lpips)
    per_chip = cfg.train.batch_size // mesh.size
    reference = (lambda: step_flops_on_one_cpu(cfg, per_chip, program.modules.kernels)) if flops else None
    return report_of(
        "train step",
        tpu_slice,
        program.step,
        (state, images, lpips),
        parts,
        per_chip,
        keep,
        reference,
        program.modules.kernels.name,
    )


def codec_reports(
    model_cfg: ModelConfig,
    tpu_slice: Slice,
    *,
    size: int,
    batch_size: int,
    dtype: str = "float32",
    keep: dict | None = None,
) -> list[Report]:
    """Encode and decode, as a codec runs them, compiled for `tpu_slice` on a global batch of
    `batch_size` images of size x size split over its chips (parameters replicated). Raises
    ValueError when `size` does not fit the model or the batch does not split over the chips."""
    problem = model_cfg.size_problem(size, "--size ")
    if problem:
        raise ValueError(problem)
    mesh = parallel.make_mesh(-1, 1, devices=topology.slice_devices(tpu_slice))
    unit = tpu_slice.chip.unit
    if batch_size % mesh.size:
        raise ValueError(
            f"--batch-size {batch_size} must be a multiple of the {mesh.size} {unit}s; "
            f"use {max(mesh.size, batch_size // mesh.size * mesh.size)}"
        )
    kernels = select("auto", mesh.devices.flat)
    per_device = batch_size // mesh.size
    programs = codec_programs(model_cfg, mesh, kernels, size=size, batch_size=batch_size, dtype=dtype)
    # the same programs for one CPU device, lowered only: FLOPs where the compiler gives none
    on_cpu = dict.fromkeys(programs)
    reports = []
    for name, (jitted, args, parts) in programs.items():

        def flops(name=name):
            if on_cpu[name] is None:
                on_cpu.update(
                    codec_programs(model_cfg, one_cpu_mesh(), kernels, size=size, batch_size=per_device, dtype=dtype)
                )
            return lowered_flops(*on_cpu[name][:2])

        reports.append(
            report_of(
                name,
                tpu_slice,
                jitted,
                args,
                parts,
                per_device,
                None if keep is None else keep.setdefault(name, {}),
                flops,
                kernels.name,
            )
        )
    return reports


def codec_programs(
    model_cfg: ModelConfig, mesh, kernels: Kernels, *, size: int, batch_size: int, dtype: str
) -> dict[str, tuple[Any, tuple, dict[str, Any]]]:
    """{"encode", "decode"} -> (jitted, abstract args, the args' parts) of the codec with
    `kernels` on `mesh`: parameters replicated, a global batch of `batch_size` split."""
    model = api.abstract_model(model_cfg, api.DTYPES[dtype], kernels)
    codec = api.codec_from_model(model, Config(model=model_cfg))
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), codec.params)
    f = model_cfg.downsample_factor
    images = jax.ShapeDtypeStruct((batch_size, size, size, model_cfg.in_channels), np.float32, sharding=split)
    latents = jax.ShapeDtypeStruct((batch_size, size // f, size // f, model_cfg.z_channels), np.float32, sharding=split)
    programs = {}
    for name, fn, x in (("encode", codec.encode_fn, images), ("decode", codec.decode_fn, latents)):
        jitted = jax.jit(codec.kernels.batch_map(fn), in_shardings=(replicated, split), out_shardings=split)
        programs[name] = (jitted, (params, x), {"parameters": params, "images" if name == "encode" else "latents": x})
    return programs


def largest_fitting(
    measure: Callable[[int], tuple[bool, float]], capacity: float, start: int = 1, limit: int = 1 << 16
) -> int:
    """The largest n in [1, limit] for which measure(n) -> (fits, bytes used) fits, for a
    measure that fits up to some n and not above; 0 when n = 1 does not fit.

    Each next n is where the line through the two measured points nearest the boundary meets
    `capacity` (memory grows about linearly with the batch), kept strictly between the largest
    n known to fit and the smallest known not to, and at most 4x the largest that fits while
    none is known not to. Without such a line (one point, a slope <= 0, or a point whose bytes
    disagree with its verdict), or where two line guesses in a row between known bounds land on
    the same side of the boundary, it doubles (halves while nothing fits) or bisects. So it ends
    at the same n as doubling and bisection, with fewer measurements where memory is close to
    linear in the batch.
    """
    low, high = 0, None  # measure(low) fits (or low is 0); measure(high) does not
    points: dict[int, float] = {}  # n -> bytes, for the n whose bytes agree with their verdict
    sides: list[bool] = []  # whether each line guess between known bounds fitted, in a row
    n, bounded_line = max(1, min(start, limit)), False
    while True:
        fits, used = measure(n)
        if fits == (used <= capacity):
            points[n] = used
        if fits:
            low = n
        else:
            high = n
        if bounded_line:
            sides.append(fits)
        if high == 1 or (high is not None and high - low <= 1) or (fits and n >= limit):
            return low
        guess = _line_guess(points, low, high, capacity)
        if guess is None or (high is not None and sides[-2:] in ([True, True], [False, False])):
            sides.clear()  # no line, or one creeping towards the boundary from one side: double, halve, bisect
            guess, bounded_line = 2 * low if high is None else (low + high) // 2 if low else high // 2, False
        else:
            bounded_line = high is not None
        # the next n lies above low, below high (or the limit), and at most 4x low while no n is known not to fit
        ceiling = min(limit, 4 * low) if high is None else high - 1
        n = max(low + 1, min(guess, ceiling))


def _line_guess(points: dict[int, float], low: int, high: int | None, capacity: float) -> int | None:
    """Where the line through the two measured points nearest the boundary (the largest below or
    at `low`, the smallest at or above `high`; else the two nearest on one side) reaches
    `capacity`, rounded down; None without two points or with a slope <= 0."""
    below = sorted(n for n in points if n <= low)
    above = sorted(n for n in points if high is not None and n >= high)
    pair = (below[-1:] + above[:1]) if below and above else (below[-2:] or above[:2])
    if len(pair) < 2:
        return None
    (n1, n2), (b1, b2) = pair, (points[pair[0]], points[pair[1]])
    slope = (b2 - b1) / (n2 - n1)
    if slope <= 0:
        return None
    return int(n1 + (capacity - b1) // slope)


def advice(report: Report, cfg: Config) -> str:
    """What to change when the step does not fit, from the settings of `cfg`."""
    unit = report.tpu_slice.chip.unit
    hints = [
        f"lower train.batch_size (now {report.batch_per_chip} per {unit}; --find-batch finds the largest that fits)"
    ]
    if not cfg.train.remat:
        hints.append(
            "set train.remat=blocks (recompute the ResnetBlocks' activations in the backward pass, about "
            "14% more FLOPs) or train.remat=true (less memory, about 18% more)"
        )
    elif cfg.train.remat != "nested":
        hints.append("set train.remat=nested (least memory: the lower resolutions recomputed twice)")
    if cfg.train.compute_dtype != "bfloat16":
        hints.append("set train.compute_dtype=bfloat16")
    if cfg.train.mesh_fsdp == 1 and report.tpu_slice.chips > 1:
        hints.append(f"shard parameters and optimizer state with train.mesh_fsdp={min(report.tpu_slice.chips, 8)}")
    if report.tpu_slice.chip.platform == "gpu" and topology.gpu_memory_fraction() < 0.9:
        hints.append(
            f"let JAX take more of each GPU: XLA_CLIENT_MEM_FRACTION=0.9 in the run's environment (and this "
            f"one's; now {topology.gpu_memory_fraction():g})"
        )
    return "; or ".join(hints)


# An array type in HLO text: dtype, dims and, when the compiler has set one, the layout (its
# minor-to-major order and, on TPU, tiles: "{3,0,2,1:T(8,128)(2,1)}").
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\](\{[^}]*\})?")
_LAYOUT = re.compile(r"\{([\d,]*)(?::[^}]*?T\(([\d,]+)\))?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")  # in a layout: the memory the array lives in
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_NOT_TRAFFIC = {
    "parameter",
    "tuple",
    "get-tuple-element",
    "constant",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
}


def _array_bytes(dtype: str, dims: str, layout: str) -> int:
    """Bytes of one array as laid out in memory: its dims in the layout's order, the minor ones
    padded to whole tiles (TPU tiles are (8, 128) and the like: a 3-channel image takes 128
    lanes), which is what a TPU moves and its cost analysis counts."""
    shape = [int(d) for d in dims.split(",") if d]
    order, tile = _LAYOUT.match(layout).groups() if layout else ("", None)
    if tile and order:
        shape = [shape[int(d)] for d in reversed(order.split(","))]  # major to minor
        for offset, size in enumerate(int(t) for t in reversed(tile.split(","))):
            if offset < len(shape):
                shape[-1 - offset] = -(-shape[-1 - offset] // size) * size
    return _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))


def _on_chip(layout: str) -> bool:
    """Whether a layout puts its array in a TPU core's own memory: memory space S(1), the vector
    memory, or S(2), the scalar memory (HBM is the default space, S(0); S(5) is the host's)."""
    space = _MEMORY_SPACE.search(layout or "")
    return bool(space) and int(space.group(1)) in (1, 2)


def _shape_bytes(text: str) -> tuple[int, int]:
    """(bytes, bytes of them in on-chip memory) of the arrays in an HLO type."""
    sizes = [(_array_bytes(*array), _on_chip(array[2])) for array in _SHAPE.findall(text)]
    return sum(size for size, _ in sizes), sum(size for size, on_chip in sizes if on_chip)


# Asynchronous copies between HBM and on-chip memory: the bytes move once, between the start and
# the done; the start's tuple holds (destination, source, context) for a copy and ((source),
# slice, context) for a slice: (the moved array, the array it comes from) are these elements.
_MOVED_ELEMENT = {"copy-start": (0, 1), "slice-start": (1, 0)}


def hlo_traffic(hlo_text: str) -> list[dict[str, Any]]:
    """The bytes each operation of a compiled (optimised) HLO module moves, most first: each
    top-level instruction's operands plus outputs, as laid out (padded to whole tiles), and an
    asynchronous copy's or slice's array twice, at its start (fused computations' insides stay
    on chip and are not counted), as a TPU's cost analysis counts them (docs/performance.md
    compares the sums). Each entry: bytes; on_chip, those of them read or written in on-chip
    memory (`_on_chip` layouts), which the cost analysis counts as it counts HBM; the
    opcode (a fusion's kind); the largest output array's shape; the JAX name the ops came from."""
    fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo_text))
    instructions, inside = [], None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            inside = header.group(1)
            continue
        match = _INSTRUCTION.match(line) if inside is not None and inside not in fused else None
        if match:
            instructions.append(match.groups())
    # operands are named, not typed, in an optimised module: their bytes are their producers'
    produced = {name: _shape_bytes(output) for name, output, _, _ in instructions}
    rows = []
    for name, output, opcode, rest in instructions:
        if opcode in _NOT_TRAFFIC or opcode.endswith("-done"):  # an asynchronous op counts at its start
            continue
        if opcode in _MOVED_ELEMENT:  # read from one memory, written to the other
            arrays = _SHAPE.findall(output)
            moved_to, moved_from = (arrays[i] for i in _MOVED_ELEMENT[opcode])
            size = _array_bytes(*moved_to)
            moved, on_chip = 2 * size, size * (_on_chip(moved_to[2]) + _on_chip(moved_from[2]))
        else:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            sizes = [produced[name], *(produced.get(operand, (0, 0)) for operand in operands)]
            moved, on_chip = (sum(column) for column in zip(*sizes))
        kind = re.search(r"kind=(\w+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        shape = max(_SHAPE.finditer(output), key=lambda array: _array_bytes(*array.groups()), default=None)
        rows.append(
            {
                "bytes": moved,
                "on_chip": on_chip,
                "op": f"{opcode}:{kind.group(1)}" if kind else opcode,
                "shape": f"{shape.group(1)}[{shape.group(2)}]" if shape else output[:40],
                "source": op_name.group(1) if op_name else name,
            }
        )
    rows.sort(key=lambda row: -row["bytes"])
    return rows


def _top_level_parts(op_name: str) -> list[str]:
    """`op_name` split at the slashes outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in op_name:
        depth += (char == "(") - (char == ")")
        if char == "/" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _unwrapped(part: str) -> str:
    """A transform's wrapping taken off: `transpose(jvp(encoder/conv_in))` -> `encoder/conv_in`."""
    while (match := re.fullmatch(r"\w+\((.*)\)", part)) is not None:
        part = match.group(1)
    return part


def layer_of(op_name: str) -> str:
    """The layer an operation of a compiled program comes from, by its JAX name: the named
    scopes between the outer `jit(...)` and the primitive (inner `jit`s left out), with
    transforms (`jvp`, `transpose`, `checkpoint`) taken off, e.g.
    `jit(train_step)/transpose(jvp(decoder/up/1/upsample))/reduce_sum` -> `decoder/up/1/upsample`
    (the models name their modules' scopes after their parameter paths). An operation outside
    every scope gives its primitive, and one without a JAX name (a copy the compiler added) its
    HLO name, digits dropped."""
    parts = _top_level_parts(op_name)
    scopes: list[str] = []
    for part in (_unwrapped(p) for p in parts[1:-1] if not p.startswith("jit(")):  # a jit names a function
        if part and (not scopes or scopes[-1] != part):
            scopes.append(part)
    if scopes:
        return "/".join(scopes)
    return re.sub(r"[.\d]+$", "", _unwrapped(parts[-1])) or op_name


def traffic_by_layer(rows: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(`layer_of` the operations, bytes, operations) summed over `rows`, most first."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        group = groups.setdefault(layer_of(row["source"].split(";")[0]), [0, 0])
        group[0] += row["bytes"]
        group[1] += 1
    return sorted(((key, b, n) for key, (b, n) in groups.items()), key=lambda item: -item[1])
