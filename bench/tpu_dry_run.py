"""The TPU programs, measured by compiling them on this host (bf16, 256 x 256, v5litepod-4 unless
--topology says otherwise): HBM per chip, FLOPs and HBM bytes per image from the compiled
programs' own analyses, the roofline-bound images/s and the largest batch per chip.

- ns1: the NextStep-1 fine-tune step (configs/nextstep1_f8c16.yaml), default settings and the
  memory setting (train.remat=blocks: the most memory saved within 15% more FLOPs; --ns1-remat).
- vae: the SD-config VAE forward and backward (L1 + 1e-6 KL on a posterior sample) against
  diffusers 0.39's FlaxAutoencoderKL, the only other Flax AutoencoderKL, compiled the same
  way, ours also with its memory setting (train.remat=nested: the largest batch; --vae-remat).
  The peer is installed into bench/.peer (pip --target), not into our environment.

Each compile runs with mimalloc preloaded (installed into bench/.mimalloc the same way; --allocator
system for glibc's): libtpu's code generation allocates heavily, and mimalloc takes about an
eighth off a compile's CPU time. The compiled programs are the same (docs/performance.md).

A full-size compile that fits takes 3-13 minutes on 2 cores; one over HBM is refused in seconds.
Near the limit the compiler recomputes activations by itself, so memory stops growing along the
line through two batch sizes and more fits than the line predicts. The VAE comparison's largest
batches are therefore searched from above (largest_from_above, from twice the prediction of the
line through 8 and 16 per chip; at most two compiles that fit each) and reported with the FLOPs
per image compiled at that batch. The ns1 memory setting's is the line's prediction (8 and 32
per chip) confirmed by one compile: a lower bound, said as "or more". Each measurement is one
job, two at a time (--jobs), each compile in its own process; docs/performance.md has the run's
time on 2 cores. --only runs a part. Ends with one JSON line.

    python bench/tpu_dry_run.py [--topology v5litepod-4 v5litepod-16] [--jobs 2] [--ns1-remat true]
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
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / ".peer"
PEER = "diffusers==0.39.0"
ALLOCATOR_DIR = ROOT / "bench" / ".mimalloc"
ALLOCATOR = "cmeel-mimalloc==3.4.3"  # mimalloc's shared library in a wheel
SIZE = 256
BATCHES = (8, 16)  # per chip: the reported batch, and the second point of the memory slope
# The batches compiled first, by how a measurement finds its largest batch (MEASUREMENTS): a
# confirmed slope's second point lies further out, so that one confirming compile suffices.
SLOPE_BATCHES = {"searched": BATCHES, "confirmed": (BATCHES[0], 32), None: BATCHES[:1]}
SEARCH_FROM = 2  # x the line's prediction: where the search from above starts
MARGIN = 0.985  # of the datasheet HBM: the compiler keeps a little for itself (15.75 of 16 GiB on v5e)

# name -> (what it compiles, config overrides, how its largest batch is found: "searched" by
# compiling from above (largest_from_above, from SEARCH_FROM x the prediction of the line through
# BATCHES: near the limit the compiler recomputes by itself and fits more than the line says),
# "confirmed" by one compile at the prediction of the line through SLOPE_BATCHES["confirmed"] (a
# lower bound), or None: not at all). The VAE comparison is searched; the ns1 memory setting, whose
# target a lower bound meets, is confirmed. {ns1_remat} and {vae_remat} are the memory settings
# (REMAT_SETTINGS, or the command line's). Listed longest first: each runs as one job.
MEASUREMENTS = {
    "vae_remat": ("vae", ["train.remat={vae_remat}"], "searched"),
    "peer": ("peer", [], "searched"),
    "ns1_remat": ("step", ["train.remat={ns1_remat}"], "confirmed"),
    "ns1": ("step", [], None),
    "vae": ("vae", [], None),
}
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


def _peer_program(mesh, per_chip: int):
    """diffusers 0.39's FlaxAutoencoderKL (SD config, bf16) forward and backward, the same loss,
    NCHW images as it takes them."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffusers.models.vae_flax import FlaxAutoencoderKL

    from sigmavae_jax import parallel

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
    params = jax.eval_shape(model.init_weights, jax.random.key(0))
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


def measure_one(name: str, topology_name: str, per_chip: int) -> dict:
    from sigmavae_jax import topology

    topology.compile_only_environment()
    from sigmavae_jax import dry_run, parallel
    from sigmavae_jax.config import load_config
    from sigmavae_jax.kernels import select

    kind, overrides, _ = MEASUREMENTS[name]
    overrides = [item.format(**remat_settings()) for item in overrides]
    tpu_slice = topology.parse_slice(topology_name)
    if kind == "step":
        cfg = load_config(
            "nextstep1_f8c16",
            [
                f"train.image_size={SIZE}",
                "train.compute_dtype=bfloat16",
                f"train.batch_size={per_chip * tpu_slice.chips}",
                *overrides,
            ],
        )
        return dry_run.train_step_report(cfg, tpu_slice).figures()
    mesh = parallel.make_mesh(devices=topology.slice_devices(tpu_slice))
    flops = None  # a GPU's compiler counts none: the same program lowered for one CPU device does
    if kind == "vae":
        import jax.numpy as jnp
        from flax import nnx

        from sigmavae_jax.models.autoencoder import AutoencoderKL

        cfg = load_config("sd", overrides)
        model = nnx.eval_shape(
            lambda: AutoencoderKL(
                cfg.model,
                rngs=nnx.Rngs(0),
                dtype=jnp.bfloat16,
                remat=cfg.train.remat,
                kernels=select("auto", mesh.devices.flat),
            )
        )
        jitted, args = _vae_program(model, mesh, per_chip)
        flops = lambda: dry_run.lowered_flops(*_vae_program(model, dry_run.one_cpu_mesh(), per_chip))  # noqa: E731
    else:
        jitted, args = _peer_program(mesh, per_chip)
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
    paths = [*extra_path, *([str(PEER_DIR)] if MEASUREMENTS[name][0] == "peer" else [])]
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


def predicted_largest(at: dict[int, dict]) -> int:
    """The largest per-chip batch under MARGIN x HBM on the line through the two measured totals."""
    (b1, f1), (b2, f2) = sorted(at.items())[:2]
    slope = (f2["hbm_total"] - f1["hbm_total"]) / (b2 - b1)
    fixed = f1["hbm_total"] - slope * b1
    return max(1, int((MARGIN * f1["hbm_capacity"] - fixed) // slope))


def fitting_at_or_below(guess: int, compile_at: Callable[[int], dict], at: dict[int, dict]) -> int:
    """Compile at `guess` per chip (compile_at(batch) -> figures, recorded in `at`), stepping down by
    about a sixteenth while it does not fit; returns the last batch compiled (1 at the least,
    whether or not it fits: its figures say)."""
    result = at[guess] = compile_at(guess)
    while not result["fits"] and guess > 1:
        guess = max(1, guess - max(1, guess // 16))
        result = at[guess] = compile_at(guess)
    return guess


def largest_from_above(start: int, compile_at: Callable[[int], dict], at: dict[int, dict], step: float = 0.04) -> int:
    """The largest per-chip batch at or below `start` that fits, searched from above, for the TPU
    compiler's costs: a program over HBM is mostly refused in seconds, one that fits takes minutes. The
    batch falls by `step` of itself while refused, then, from just below the smallest refused,
    by one: so at most two compiles fit. compile_at(batch) -> figures, recorded in `at`; returns
    0 when 1 per chip does not fit, `start` when it fits (the largest is then at least that)."""
    batch, refused = max(1, start), None
    while True:
        result = at[batch] = compile_at(batch)
        if result["fits"]:
            break
        if batch == 1:
            return 0
        refused, batch = batch, max(1, min(batch - 1, int(batch * (1 - step))))
    if refused is None or refused - batch == 1:
        return batch
    for above in range(refused - 1, batch, -1):
        result = at[above] = compile_at(above)
        if result["fits"]:
            return above
    return batch


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
    parser.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS))
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
    if "peer" in args.only:
        ensure_peer()
    library = allocator_library() if args.allocator == "mimalloc" else None
    if library:  # the compiling processes inherit it
        os.environ["LD_PRELOAD"] = os.pathsep.join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    start = time.perf_counter()
    figures: dict[tuple[str, str], dict[int, dict]] = {}
    largest: dict[tuple[str, str], int] = {}

    def measure(key) -> None:
        """Its first batches, then its largest batch as MEASUREMENTS says, into figures and largest."""
        at, found = figures.setdefault(key, {}), MEASUREMENTS[key[0]][2]
        for batch in SLOPE_BATCHES[found]:
            at[batch] = run_one(*key, batch)
        if found == "searched":
            largest[key] = largest_from_above(SEARCH_FROM * predicted_largest(at), lambda b: run_one(*key, b), at)
        elif found == "confirmed":
            largest[key] = fitting_at_or_below(predicted_largest(at), lambda b: run_one(*key, b), at)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [
            pool.submit(measure, (name, topo)) for topo in args.topology for name in MEASUREMENTS if name in args.only
        ]
        for job in jobs:
            job.result()
    print(f"\n{time.perf_counter() - start:.0f} s of compiles\n")

    summary = {}
    for topo in args.topology:
        print(
            f"| {topo} | HBM at {BATCHES[0]}/chip | TFLOP/image | GB/image | roofline images/s/chip "
            "| largest batch/chip | TFLOP/image there |"
        )
        print("|---|---|---|---|---|---|---|")
        for name in args.only:
            at = figures[(name, topo)][BATCHES[0]]
            rate = at["roofline_images_per_s_per_chip"]
            found = MEASUREMENTS[name][2]
            batch, there = "-", "-"
            if found:
                most = largest[(name, topo)]
                batch = f"{most} ({found})" + (
                    " or more" if found == "confirmed" or most == max(figures[(name, topo)]) else ""
                )
                there = f"{figures[(name, topo)][most]['flops_per_image'] / 1e12:.3f}" if most else "-"
            label = f"{name} (train.remat={settings[name]})" if name in settings else name
            print(
                f"| {label} | {at['hbm_total'] / 2**30:.2f} GiB | {at['flops_per_image'] / 1e12:.3f} "
                f"| {at['bytes_per_image'] / 1e9:.2f} | {rate:.1f} ({at['bound']}) | {batch} | {there} |"
            )
        print()
    topo = args.topology[0]

    def at8(name, key):
        return figures[(name, topo)][BATCHES[0]][key]

    def at_largest(name, key):
        return figures[(name, topo)][largest[(name, topo)]][key]

    if {"ns1", "ns1_remat"} <= set(args.only):
        summary.update(
            ns1_v5e_max_batch_per_chip=largest[("ns1_remat", topo)],
            ns1_v5e_memory_setting_extra_flops=at8("ns1_remat", "flops_per_image") / at8("ns1", "flops_per_image") - 1,
            ns1_v5e_roofline_images_per_s_per_chip=at8("ns1", "roofline_images_per_s_per_chip"),
            ns1_v5e_bytes_per_image=at8("ns1", "bytes_per_image"),
            ns1_v5e_flops_per_image=at8("ns1", "flops_per_image"),
            ns1_v5e_hbm_at_8_per_chip=at8("ns1", "hbm_total"),
        )
    if {"vae", "vae_remat", "peer"} <= set(args.only):
        summary.update(
            vae_bytes_per_image_vs_peer=at8("vae", "bytes_per_image") / at8("peer", "bytes_per_image"),
            vae_flops_per_image_vs_peer=at8("vae", "flops_per_image") / at8("peer", "flops_per_image"),
            vae_max_batch_vs_peer=largest[("vae_remat", topo)] / largest[("peer", topo)],
            vae_max_batch_per_chip=largest[("vae_remat", topo)],
            peer_max_batch_per_chip=largest[("peer", topo)],
            vae_memory_setting_extra_flops=at8("vae_remat", "flops_per_image") / at8("vae", "flops_per_image") - 1,
            # each at its largest batch, where the peer's compiler recomputes too
            vae_max_batch_flops_vs_peer=at_largest("vae_remat", "flops_per_image")
            / at_largest("peer", "flops_per_image"),
        )
    memory_settings = {name: f"train.remat={value}" for name, value in settings.items()}
    print(json.dumps({"topology": topo, "memory_settings": memory_settings, **summary}))


if __name__ == "__main__":
    main()
