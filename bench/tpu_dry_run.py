"""The TPU programs, measured by compiling them on this host (bf16, 256 x 256, v5litepod-4 unless
--topology says otherwise): HBM per chip, FLOPs and HBM bytes per image from the compiled
programs' own analyses, the roofline-bound images/s and the largest batch per chip.

- ns1: the NextStep-1 fine-tune step (configs/nextstep1_f8c16.yaml), default settings and the
  memory setting (train.remat=blocks: the most memory saved within 15% more FLOPs at a batch the
  default fits without recomputing; --ns1-remat). Near its largest batch the default's compiler
  recomputes by itself, so the default may fit more.
- vae: the SD-config VAE forward and backward (L1 + 1e-6 KL on a posterior sample) against
  diffusers 0.39's FlaxAutoencoderKL, the only other Flax AutoencoderKL, compiled the same
  way, ours also with its memory setting (train.remat=nested: the largest batch; --vae-remat).
  The peer is installed into bench/.peer (pip --target), not into our environment.

- encode, decode (asked for with --only): our SD-config encode and decode as `eval.py --dry-run`
  compiles them (inference, bf16), against the peer's (peer_encode, peer_decode).

HBM, FLOPs and bytes are compared at 8 images per chip. The largest batches (ns1's with both
settings, our VAE's with its memory setting, the peer's) are searched from above
(largest_from_above, from --search-from per chip), for the TPU compiler's costs: a compile that
fits takes 3-13 minutes on 2 cores, one over HBM is mostly refused in seconds, with the memory it
needed, which sets the next batch tried.
So each search compiles one program that fits (and one more in full where the compiler's code
pushes a program over HBM only at the end of its compile), and reports it with the smallest
refused batch above it: the largest lies between them. Near the limit the compiler recomputes
activations by itself and fits more than a line through two batch sizes predicts, so a
prediction would not do; the FLOPs per image are reported at the batch found too.

Each compile runs with mimalloc preloaded (installed into bench/.mimalloc the same way; --allocator
system for glibc's): libtpu's code generation allocates heavily, and mimalloc takes about an
eighth off a compile's CPU time. The compiled programs are the same (docs/performance.md).
Each search and each compile at 8 per chip is one job, two at a time (--jobs), each compile in
its own process; docs/performance.md has the run's time on 2 cores. --only runs a part. Ends
with one JSON line.

    python bench/tpu_dry_run.py [--topology v5litepod-4 v5litepod-16] [--jobs 2] [--ns1-remat true]
    python bench/tpu_dry_run.py --only encode decode peer_encode peer_decode
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / ".peer"
PEER = "diffusers==0.39.0"
ALLOCATOR_DIR = ROOT / "bench" / ".mimalloc"
ALLOCATOR = "cmeel-mimalloc==3.4.3"  # mimalloc's shared library in a wheel
SIZE = 256
REPORTED_BATCH = 8  # per chip: where HBM, FLOPs and bytes per image are compared
SEARCH_FROM = 256  # per chip: where the searches for the largest batch start (--search-from)
SEARCH_STEP = 0.04  # the least a refused batch takes the search down, as a fraction of itself
MARGIN = 0.985  # of the datasheet HBM: the compiler keeps a little for itself (15.75 of 16 GiB on v5e)


class Measurement(NamedTuple):
    program: str  # "step" (configs/nextstep1_f8c16.yaml), "vae" (ours, SD config), "peer", or a codec
    # program: "encode" or "decode" (ours, SD config, as eval.py --dry-run compiles them), "peer_encode" or
    # "peer_decode"
    overrides: tuple[str, ...]  # config overrides; {ns1_remat} and {vae_remat}: the memory settings
    at_reported_batch: bool  # compiled at REPORTED_BATCH per chip
    searched: bool  # its largest batch per chip searched (largest_from_above)


# Listed longest first: each search and each compile at REPORTED_BATCH runs as one job. The VAE
# memory setting is compiled only where its search takes it: its comparison with the peer is the
# largest batch, with each program's FLOPs per image there. Our VAE's default settings are compared
# at REPORTED_BATCH only.
MEASUREMENTS = {
    "ns1_remat": Measurement("step", ("train.remat={ns1_remat}",), True, True),
    "ns1": Measurement("step", (), True, True),
    "peer": Measurement("peer", (), True, True),
    "vae_remat": Measurement("vae", ("train.remat={vae_remat}",), False, True),
    "vae": Measurement("vae", (), True, False),
    "encode": Measurement("encode", (), True, False),
    "decode": Measurement("decode", (), True, False),
    "peer_encode": Measurement("peer_encode", (), True, False),
    "peer_decode": Measurement("peer_decode", (), True, False),
}
# What a plain run measures (issue 12's figures); the codec programs (inference, for users who
# call encode/decode from their own models) are asked for with --only.
DEFAULT_MEASUREMENTS = ("ns1_remat", "ns1", "peer", "vae_remat", "vae")
CODEC_MEASUREMENTS = ("encode", "decode", "peer_encode", "peer_decode")
# The memory settings: for ns1 the one that saves the most within issue 12's 15% more FLOPs, for
# the VAE the one with the largest batch (its comparison has no FLOPs limit).
REMAT_SETTINGS = {"ns1_remat": "blocks", "vae_remat": "nested"}
REMAT_CHOICES = ("true", "blocks", "convs", "nested")


def remat_settings() -> dict[str, str]:
    """The memory settings of this run: REMAT_SETTINGS, overridden by SIGMAVAE_BENCH_<NAME>
    (which main sets from the command line for the compiling processes)."""
    return {name: os.environ.get(f"SIGMAVAE_BENCH_{name.upper()}", value) for name, value in REMAT_SETTINGS.items()}


# ------------------------------------------------------------------------------------------
# One compile, in a process of its own: `python bench/tpu_dry_run.py --one NAME TOPOLOGY B`.


def _vae_program(model, mesh, per_chip: int):
    """Our SD VAE's forward and backward, jitted for `mesh` (parameters replicated, the batch
    split), at abstract arguments."""
    import jax
    import numpy as np
    from flax import nnx

    from sigmavae_jax import losses, parallel

    graph, params = nnx.split(model)
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def grads(params, x, key):
        def loss_fn(params):
            vae = nnx.merge(graph, params)
            posterior = vae.posterior(x)
            x_hat = vae.decode(posterior.sample(key))
            return jax.numpy.mean(jax.numpy.abs(x - x_hat)) + 1e-6 * losses.kl_loss(posterior.kl())

        return jax.grad(loss_fn)(params)

    args = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params),
        jax.ShapeDtypeStruct((per_chip * mesh.size, SIZE, SIZE, 3), np.float32, sharding=split),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
    )
    return jax.jit(grads, in_shardings=(replicated, split, replicated), out_shardings=replicated), args


def _peer_model():
    """diffusers 0.39's FlaxAutoencoderKL, SD config, bf16, and its parameters as shapes."""
    import jax
    import jax.numpy as jnp
    from diffusers.models.vae_flax import FlaxAutoencoderKL

    model = FlaxAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SIZE,
        dtype=jnp.bfloat16,
    )
    return model, jax.eval_shape(model.init_weights, jax.random.key(0))


def _peer_program(mesh, per_chip: int):
    """The peer's forward and backward, the same loss as `_vae_program`, NCHW images as it
    takes them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sigmavae_jax import parallel

    model, params = _peer_model()
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def grads(params, x, key):
        def loss_fn(params):
            posterior = model.apply({"params": params}, x, method=model.encode).latent_dist
            x_hat = model.apply({"params": params}, posterior.sample(key), method=model.decode).sample
            kl = posterior.kl()  # (B,): summed over latent elements
            return jnp.mean(jnp.abs(x - x_hat.astype(jnp.float32))) + 1e-6 * jnp.mean(kl)

        return jax.grad(loss_fn)(params)

    args = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params),
        jax.ShapeDtypeStruct((per_chip * mesh.size, 3, SIZE, SIZE), np.float32, sharding=split),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
    )
    return jax.jit(grads, in_shardings=(replicated, split, replicated), out_shardings=replicated), args


def _peer_codec_program(mesh, per_chip: int, which: str):
    """The peer's encode (NCHW images -> the posterior mean) or decode (NCHW latents -> images),
    parameters replicated and the batch split, as `dry_run.codec_programs` compiles ours."""
    import jax
    import numpy as np

    from sigmavae_jax import parallel

    model, params = _peer_model()
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    if which == "encode":
        fn = lambda p, x: model.apply({"params": p}, x, method=model.encode).latent_dist.mean  # noqa: E731
        shape = (per_chip * mesh.size, 3, SIZE, SIZE)
    else:
        fn = lambda p, z: model.apply({"params": p}, z, method=model.decode).sample  # noqa: E731
        shape = (per_chip * mesh.size, 4, SIZE // 8, SIZE // 8)
    args = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params),
        jax.ShapeDtypeStruct(shape, np.float32, sharding=split),
    )
    return jax.jit(fn, in_shardings=(replicated, split), out_shardings=split), args


def ns1_config(batch_size: int, overrides: list[str] | tuple[str, ...] = ()):
    """configs/nextstep1_f8c16.yaml at SIZE in bf16 with a global batch of `batch_size`, then
    `overrides`."""
    from sigmavae_jax.config import load_config

    sized = [f"train.image_size={SIZE}", "train.compute_dtype=bfloat16", f"train.batch_size={batch_size}"]
    return load_config("nextstep1_f8c16", [*sized, *overrides])


def sd_vae(mesh, overrides: list[str] | tuple[str, ...] = ()):
    """Our SD-config AutoencoderKL in bf16 as shapes (no weights), with the kernels of `mesh`'s
    devices and the config's train.remat after `overrides`."""
    import jax.numpy as jnp
    from flax import nnx

    from sigmavae_jax.config import load_config
    from sigmavae_jax.kernels import select
    from sigmavae_jax.models.autoencoder import AutoencoderKL
    from sigmavae_jax.models.init_rngs import init_rngs

    cfg = load_config("sd", overrides)
    return nnx.eval_shape(
        lambda: AutoencoderKL(
            cfg.model,
            rngs=init_rngs(0),
            dtype=jnp.bfloat16,
            remat=cfg.train.remat,
            kernels=select("auto", mesh.devices.flat),
        )
    )


def measure_one(name: str, topology_name: str, per_chip: int) -> dict:
    from sigmavae_jax import topology

    topology.compile_only_environment()
    from sigmavae_jax import dry_run, parallel

    kind = MEASUREMENTS[name].program
    overrides = [item.format(**remat_settings()) for item in MEASUREMENTS[name].overrides]
    tpu_slice = topology.parse_slice(topology_name)
    if kind == "step":
        cfg = ns1_config(per_chip * tpu_slice.chips, overrides)
        return dry_run.train_step_report(cfg, tpu_slice).figures()
    mesh = parallel.make_mesh(devices=topology.slice_devices(tpu_slice))
    if kind in ("encode", "decode"):
        from sigmavae_jax.config import load_config
        from sigmavae_jax.kernels import select

        model_cfg = load_config("sd").model
        programs = dry_run.codec_programs(
            model_cfg,
            mesh,
            select("auto", mesh.devices.flat),
            size=SIZE,
            batch_size=per_chip * mesh.size,
            dtype="bfloat16",
        )
        jitted, args, parts = programs[kind]
        return dry_run.report_of(name, tpu_slice, jitted, args, parts, per_chip).figures()
    flops = None  # a GPU's compiler counts none: the same program lowered for one CPU device does
    if kind == "vae":
        model = sd_vae(mesh, overrides)
        jitted, args = _vae_program(model, mesh, per_chip)
        flops = lambda: dry_run.lowered_flops(*_vae_program(model, dry_run.one_cpu_mesh(), per_chip))  # noqa: E731
    elif kind == "peer":
        jitted, args = _peer_program(mesh, per_chip)
    else:
        jitted, args = _peer_codec_program(mesh, per_chip, kind.removeprefix("peer_"))
    parts = {"parameters": args[0], "images": args[1]}
    return dry_run.report_of(name, tpu_slice, jitted, args, parts, per_chip, flops=flops).figures()


# ------------------------------------------------------------------------------------------
# The driver.


def install_beside(spec: str, folder: pathlib.Path, provides: pathlib.Path) -> None:
    """pip install `spec` (without dependencies) into `folder`, an environment of the bench's own,
    unless `provides` (a path the install creates) is there already."""
    if provides.exists():
        return
    print(f"installing {spec} into {folder} (the bench's own, not our environment)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder), spec], check=True
    )


def ensure_peer() -> None:
    install_beside(PEER, PEER_DIR, PEER_DIR / "diffusers")


def allocator_library() -> str | None:
    """mimalloc's shared library (installed into ALLOCATOR_DIR on first use), or None, said on
    stdout, where it cannot be had: the compiles then use the system allocator."""
    library = ALLOCATOR_DIR / "cmeel.prefix" / "lib" / "libmimalloc.so"
    try:
        install_beside(ALLOCATOR, ALLOCATOR_DIR, library)
    except subprocess.CalledProcessError:
        pass  # said below
    if library.is_file():
        return str(library)
    print(f"no {library} from {ALLOCATOR}: compiling with the system allocator (slower)", flush=True)
    return None


def run_one(name: str, topology_name: str, per_chip: int, extra_path: tuple[str, ...] = ()) -> dict:
    """One compile in a process of its own; extra_path: folders put on its PYTHONPATH."""
    env = dict(os.environ)
    paths = [*extra_path, *([str(PEER_DIR)] if MEASUREMENTS[name].program.startswith("peer") else [])]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, topology_name, str(per_chip)], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{name} at {per_chip}/chip failed:\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1])
    total = figures["hbm_total"] / 2**30
    print(
        f"  {name:<10} {topology_name:<13} {per_chip:>4}/chip: {total:6.2f} GiB "
        f"{'fits' if figures['fits'] else 'DOES NOT FIT'}"
        f" ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return figures


def largest_from_above(
    start: int, compile_at: Callable[[int], dict], at: dict[int, dict], step: float = SEARCH_STEP
) -> int:
    """The largest per-chip batch that fits, from below: the first that fits in a search down from
    `start`, for the TPU compiler's costs (a program over HBM is mostly refused in seconds, with
    the memory it needed; one that fits takes minutes). compile_at(batch) -> figures ("fits",
    "hbm_total", "hbm_capacity"), recorded in `at`. Returns 0 when 1 per chip does not fit, `start` when it fits.

    A refused batch B needing M bytes is followed by (1 - step) x the lesser of B and
    B x (MARGIN x HBM) / M: far above the limit the refusal's own figure takes the search down in
    one compile, near it the search steps down. It aims `step` under the limit because a compile
    just over it after code generation costs as much as one that fits, and does not end the
    search. It ends at the first batch that fits, with one compile that fits (and one more full
    compile where one is refused late): the largest lies between it and the smallest refused batch above it
    (smallest_refused_above). Where memory grows less than in proportion to the batch (a fixed
    part, the compiler's own recomputation near the limit), B x (MARGIN x HBM) / M is at or above
    the largest batch, so the batch found is within `step` of it; the compiler's figures do not
    always grow so (docs/performance.md), hence the bracket.
    """
    batch = max(1, start)
    while True:
        result = at[batch] = compile_at(batch)
        if result["fits"]:
            return batch
        if batch == 1:
            return 0
        needed = result["hbm_total"]  # 0 where the compiler said nothing: then down by `step`
        in_proportion = batch * MARGIN * result["hbm_capacity"] / needed if needed else batch
        batch = max(1, min(batch - 1, int((1 - step) * min(batch, in_proportion))))


def smallest_refused_above(at: dict[int, dict], batch: int) -> int | None:
    """The smallest batch in `at` above `batch` that did not fit (None when there is none)."""
    return min((b for b, figures in at.items() if b > batch and not figures["fits"]), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--topology", nargs="+", default=["v5litepod-4"], help="TPU slices (the first gives the JSON keys)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="compiles at a time (each its own process)")
    parser.add_argument(
        "--allocator",
        choices=("mimalloc", "system"),
        default="mimalloc",
        help="the compiling processes' malloc (default: mimalloc, preloaded; the same programs, faster)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(MEASUREMENTS),
        default=list(DEFAULT_MEASUREMENTS),
        help=f"the measurements to run (default: {' '.join(DEFAULT_MEASUREMENTS)}; the codec programs against "
        f"the peer's: {' '.join(CODEC_MEASUREMENTS)})",
    )
    parser.add_argument(
        "--search-from",
        type=int,
        default=SEARCH_FROM,
        help=f"per-chip batch where the searches for the largest batch start (default: {SEARCH_FROM})",
    )
    for name, value in REMAT_SETTINGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            default=value,
            choices=REMAT_CHOICES,
            help=f"train.remat of {name} (default: {value})",
        )
    parser.add_argument("--one", nargs=3, metavar=("NAME", "TOPOLOGY", "PER_CHIP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, topology_name, per_chip = args.one
        print(json.dumps(measure_one(name, topology_name, int(per_chip))))
        return
    for name in REMAT_SETTINGS:
        os.environ[f"SIGMAVAE_BENCH_{name.upper()}"] = getattr(args, name)
    settings = remat_settings()
    if any(name.startswith("peer") for name in args.only):
        ensure_peer()
    library = allocator_library() if args.allocator == "mimalloc" else None
    if library:  # the compiling processes inherit it
        os.environ["LD_PRELOAD"] = os.pathsep.join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    start = time.perf_counter()
    figures: dict[tuple[str, str], dict[int, dict]] = {}  # (name, topology) -> batch per chip -> figures
    largest: dict[tuple[str, str], int] = {}

    def search(key) -> None:
        at = figures.setdefault(key, {})
        largest[key] = largest_from_above(args.search_from, lambda batch: run_one(*key, batch), at)

    def compile_reported(key) -> None:
        figures.setdefault(key, {})[REPORTED_BATCH] = run_one(*key, REPORTED_BATCH)

    keys = [(name, topo) for topo in args.topology for name in MEASUREMENTS if name in args.only]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # the searches first: the longest jobs
        jobs = [pool.submit(search, key) for key in keys if MEASUREMENTS[key[0]].searched]
        jobs += [pool.submit(compile_reported, key) for key in keys if MEASUREMENTS[key[0]].at_reported_batch]
        for job in jobs:
            job.result()
    print(f"\n{time.perf_counter() - start:.0f} s of compiles\n")

    def described(figures_at: dict | None) -> list[str]:
        """HBM per chip, TFLOP and GB per image, roofline images/s per chip, or dashes."""
        if not figures_at:
            return ["-"] * 4
        return [
            f"{figures_at['hbm_total'] / 2**30:.2f} GiB",
            f"{figures_at['flops_per_image'] / 1e12:.3f}",
            f"{figures_at['bytes_per_image'] / 1e9:.2f}",
            f"{figures_at['roofline_images_per_s_per_chip']:.1f} ({figures_at['bound']})",
        ]

    for topo in args.topology:
        print(
            f"| {topo} | HBM at {REPORTED_BATCH}/chip | TFLOP/image | GB/image | roofline images/s/chip "
            "| largest batch/chip (smallest refused) | HBM there | TFLOP/image there | GB/image there |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.only:
            at = figures[(name, topo)]
            cells = described(at.get(REPORTED_BATCH))
            if MEASUREMENTS[name].searched and largest[(name, topo)]:
                most = largest[(name, topo)]
                refused = smallest_refused_above(at, most)
                there = described(at[most])
                cells += [f"{most} ({refused})" if refused else f"{most} or more", *there[:3]]
            elif MEASUREMENTS[name].searched:
                cells += ["none fits", "-", "-", "-"]
            else:
                cells += ["-"] * 4
            label = f"{name} (train.remat={settings[name]})" if name in settings else name
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    topo = args.topology[0]

    def at_reported(name, key):
        return figures[(name, topo)][REPORTED_BATCH][key]

    def at_largest(name, key):
        """The figure at the largest batch found, None where none fits."""
        most = largest[(name, topo)]
        return figures[(name, topo)][most][key] if most else None

    def over(a, b):
        """a / b, None where either is missing (no batch fits)."""
        return None if a is None or not b else a / b

    def extra(a, b):
        """a / b - 1, None where either is missing."""
        ratio = over(a, b)
        return None if ratio is None else ratio - 1

    summary = {}
    if {"ns1", "ns1_remat"} <= set(args.only):
        default_flops = at_reported("ns1", "flops_per_image")
        summary.update(
            ns1_v5e_max_batch_per_chip=largest[("ns1_remat", topo)],
            ns1_v5e_default_max_batch_per_chip=largest[("ns1", topo)],
            ns1_v5e_memory_setting_extra_flops=extra(at_reported("ns1_remat", "flops_per_image"), default_flops),
            ns1_v5e_memory_setting_extra_flops_at_max_batch=extra(
                at_largest("ns1_remat", "flops_per_image"), default_flops
            ),
            # near its largest batch the compiler recomputes by itself: its FLOPs there, over those at 8
            ns1_v5e_default_extra_flops_at_max_batch=extra(at_largest("ns1", "flops_per_image"), default_flops),
            ns1_v5e_roofline_images_per_s_per_chip=at_reported("ns1", "roofline_images_per_s_per_chip"),
            ns1_v5e_bytes_per_image=at_reported("ns1", "bytes_per_image"),
            ns1_v5e_flops_per_image=default_flops,
            ns1_v5e_hbm_at_8_per_chip=at_reported("ns1", "hbm_total"),
        )
    if {"vae", "vae_remat", "peer"} <= set(args.only):
        summary.update(
            vae_bytes_per_image_vs_peer=over(
                at_reported("vae", "bytes_per_image"), at_reported("peer", "bytes_per_image")
            ),
            vae_flops_per_image_vs_peer=over(
                at_reported("vae", "flops_per_image"), at_reported("peer", "flops_per_image")
            ),
            vae_max_batch_vs_peer=over(largest[("vae_remat", topo)], largest[("peer", topo)]),
            vae_max_batch_per_chip=largest[("vae_remat", topo)],
            peer_max_batch_per_chip=largest[("peer", topo)],
            # the memory setting at its largest batch, over the default settings at REPORTED_BATCH
            vae_memory_setting_extra_flops=extra(
                at_largest("vae_remat", "flops_per_image"), at_reported("vae", "flops_per_image")
            ),
            # each at its largest batch, where the peer's compiler recomputes too
            vae_max_batch_flops_vs_peer=over(
                at_largest("vae_remat", "flops_per_image"), at_largest("peer", "flops_per_image")
            ),
        )
    for program in ("encode", "decode"):
        if {program, f"peer_{program}"} <= set(args.only):
            for figure in ("bytes_per_image", "flops_per_image", "hbm_total"):
                summary[f"{program}_{figure}_vs_peer"] = over(
                    at_reported(program, figure), at_reported(f"peer_{program}", figure)
                )
    memory_settings = {name: f"train.remat={value}" for name, value in settings.items() if name in args.only}
    print(json.dumps({"topology": topo, "memory_settings": memory_settings, **summary}))


if __name__ == "__main__":
    main()
