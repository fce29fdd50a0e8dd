"""`train.py --dry-run` and `eval.py --dry-run`: compile for a TPU slice or GPUs on this host, print
the report, end with one JSON line, and exit 0 when everything fits, 4 when it does not (2 for a
bad name or setting, or a missing compiler)."""

from __future__ import annotations

import json
import sys
import time

from sigmavae_jax.cli.shared_args import non_negative_int

DOES_NOT_FIT = 4


def add_arguments(parser, program: str) -> None:
    """--dry-run and --topology, for a command line that compiles `program` ("the step", ...)."""
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"compile {program} for --topology on this host (no TPU, GPU, weights or data needed) and "
        f"report HBM per device, FLOPs and bytes per image, roofline images/s; exit {DOES_NOT_FIT} if it "
        "does not fit",
    )
    parser.add_argument(
        "--topology",
        metavar="NAME",
        help="with --dry-run: a TPU slice, as JAX names it (v5e:4x4, v4:2x2x4) or as Cloud does "
        "(v5litepod-16, v4-32, v5p-8, v6e-8), or GPUs: h100, h200, a100-80gb, b200, one node of 8 as "
        "8xh100, 2 nodes of 8 as 2x8xh100 (GPUs need pip install -e '.[gpu]')",
    )
    parser.add_argument(
        "--dump-top",
        type=non_negative_int,
        default=0,
        metavar="N",
        help=f"with --dry-run: list the N operations of {program} as compiled that move the most HBM bytes",
    )


def _slice(name: str):
    """The slice or GPUs named `name`, in a process set up to compile only (before JAX starts)."""
    from sigmavae_jax import topology

    topology.compile_only_environment()
    return topology.parse_slice(name)


def _devices(tpu_slice) -> str:
    """ "4 chips, 1 host" or "16 GPUs, 2 nodes"."""
    unit, host = tpu_slice.chip.unit, "node" if tpu_slice.chip.platform == "gpu" else "host"
    return f"{tpu_slice.chips} {unit}s, {tpu_slice.hosts} {host}" + "s" * (tpu_slice.hosts > 1)


def train(cfg, topology_name: str, *, find_batch: bool, dump_top: int = 0, keep: dict | None = None) -> int:
    """The training step of `cfg` on the slice; with find_batch, at the largest per-device batch
    that fits (`dry_run.largest_fitting` from the config's batch); dump_top: list the operations of
    the compiled program (with find_batch, the largest batch's) that move the most HBM bytes.
    keep: when given (and not find_batch), gets the compiled program under "compiled"."""
    tpu_slice = _slice(topology_name)
    from sigmavae_jax import dry_run
    from sigmavae_jax.config import with_overrides

    chips, unit = tpu_slice.chips, tpu_slice.chip.unit
    print(f"compiling the train step for {tpu_slice.topology} ({_devices(tpu_slice)}) on this host", flush=True)
    if not find_batch:
        keep = {} if keep is None else keep
        report = dry_run.train_step_report(cfg, tpu_slice, keep=keep)
        if dump_top and "compiled" in keep:
            print_top_ops(keep["compiled"], dump_top, report.batch_per_chip)
        return _finish(report, {}, dry_run.advice(report, cfg))

    reports = {}
    largest_compiled = {}  # with dump_top: the largest fitting batch's compiled program, by batch

    def at(per_chip: int):
        return with_overrides(cfg, [f"train.batch_size={per_chip * chips}"])

    def measure(per_chip: int) -> tuple[bool, int]:
        start = time.perf_counter()
        kept = {} if dump_top else None
        reports[per_chip] = report = dry_run.train_step_report(at(per_chip), tpu_slice, keep=kept, flops=False)
        if report.fits and kept and per_chip > max(largest_compiled, default=0):
            largest_compiled.clear()  # one compiled program held at a time
            largest_compiled[per_chip] = kept["compiled"]
        verdict = "fits" if report.fits else "does not fit"
        print(
            f"  {per_chip:>5} images per {unit}: {report.total / 2**30:7.2f} GiB, {verdict} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        return report.fits, report.total

    best = dry_run.largest_fitting(measure, tpu_slice.capacity, start=max(1, cfg.train.batch_size // chips))
    batch = best or min(reports)
    report = dry_run.fill_step_flops(reports[batch], at(batch))
    extra = {"max_batch_per_chip": best, "max_global_batch": best * chips}
    print(f"largest batch that fits: {best} per {unit} (train.batch_size={best * chips})")
    if best in largest_compiled:
        print_top_ops(largest_compiled[best], dump_top, best)
    smallest = reports[min(n for n, r in reports.items() if r.fits)] if best else None
    if smallest is not None and smallest.flops_per_image and report.flops_per_image and smallest is not report:
        # near the memory limit the compiler recomputes activations by itself: FLOPs per image grow
        extra["max_batch_extra_flops"] = report.flops_per_image / smallest.flops_per_image - 1
        print(
            f"FLOPs per image at {best} per {unit}: {extra['max_batch_extra_flops']:+.1%} against "
            f"{smallest.batch_per_chip} per {unit} (the compiler recomputes activations near the memory limit)"
        )
    return _finish(report, extra, dry_run.advice(report, cfg))


def codec(model_cfg, topology_name: str, *, size: int, batch_size: int, dtype: str, dump_top: int = 0) -> int:
    """Encode and decode on the slice; dump_top: list the operations of each compiled program
    that move the most HBM bytes."""
    tpu_slice = _slice(topology_name)
    from sigmavae_jax import dry_run, topology

    print(f"compiling encode and decode for {tpu_slice.topology} ({_devices(tpu_slice)}) on this host", flush=True)
    keep = {}
    reports = dry_run.codec_reports(model_cfg, tpu_slice, size=size, batch_size=batch_size, dtype=dtype, keep=keep)
    for report in reports:
        print("\n".join(report.lines()))
        if dump_top and "compiled" in keep[report.program]:
            print_top_ops(keep[report.program]["compiled"], dump_top, report.batch_per_chip)
    figures = {report.program: report.figures() for report in reports}
    fits = all(report.fits for report in reports)
    if not fits:
        more = (
            f"; or raise XLA_CLIENT_MEM_FRACTION (now {topology.gpu_memory_fraction():g}) in the run's environment "
            "and this one's"
            if tpu_slice.chip.platform == "gpu"
            else ""
        )
        print(f"error: does not fit in HBM; lower --batch-size or use --dtype bfloat16{more}", file=sys.stderr)
    print(json.dumps(figures))
    return 0 if fits else DOES_NOT_FIT


def print_top_ops(compiled, count: int, batch_per_chip: int) -> None:
    """The operations of `compiled` that move the most HBM bytes, and the same summed by where
    in the JAX program they come from."""
    from sigmavae_jax import dry_run

    rows = dry_run.hlo_traffic(compiled.as_text())
    total = dry_run.cost_of(compiled).get("bytes accessed")
    listed = sum(row["bytes"] for row in rows)
    analysed = f"{total / 1e9:.2f} GB (cost analysis)" if total is not None else "no cost analysis from this compiler"
    on_chip = sum(row["on_chip"] for row in rows)
    print(
        f"HBM traffic per device: {analysed}; {listed / 1e9:.2f} GB over {len(rows)} operations "
        f"(operands + outputs as laid out, an asynchronous move once, read from the program)"
    )
    if on_chip:  # TPU: what XLA stages in the vector memory next to the cores
        print(
            f"  of which {on_chip / 1e9:.2f} GB ({100 * on_chip / max(listed, 1):.0f}%) are read or written in the "
            f"chip's own memory, not HBM, though the cost analysis counts them alike"
        )
    print(f"the {count} operations that move the most:")
    print(f"  {'GB':>7} {'MB/image':>9} {'on chip':>7}  {'op':<22} {'output':<28} source")
    for row in rows[:count]:
        print(
            f"  {row['bytes'] / 1e9:7.3f} {row['bytes'] / batch_per_chip / 1e6:9.1f} "
            f"{100 * row['on_chip'] / max(row['bytes'], 1):6.0f}%  {row['op']:<22} {row['shape']:<28} "
            f"{row['source'][-110:]}"
        )
    print("summed by layer:")
    print(f"  {'GB':>7} {'share':>6} {'ops':>5}  layer")
    for layer, size, ops in dry_run.traffic_by_layer(rows)[:count]:
        print(f"  {size / 1e9:7.3f} {100 * size / max(listed, 1):5.1f}% {ops:>5}  {layer}")


def _finish(report, extra: dict, advice: str) -> int:
    print("\n".join(report.lines()))
    if not report.fits:
        print(f"error: the step does not fit in {report.tpu_slice.chip.name} HBM; {advice}", file=sys.stderr)
    print(json.dumps({**report.figures(), **extra}))
    return 0 if report.fits else DOES_NOT_FIT
