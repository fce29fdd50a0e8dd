"""The training programs run on the accelerator this process sees (one GPU), bf16, 256 x 256:
time per step and images/s, compile time, and memory as the compiled program plans it and as
the device's allocator saw it at its peak.

- ns1: the NextStep-1 fine-tune step (configs/nextstep1_f8c16.yaml, decoder trained, L2 + LPIPS)
  as `train.py` builds it (`train.program.build_program`), on random images; LPIPS with random
  weights of the right shapes (the time does not depend on their values).
- vae and peer: the SD-config VAE forward and backward (L1 + 1e-6 KL), ours against diffusers
  0.39's FlaxAutoencoderKL, the programs bench/tpu_dry_run.py compiles (there for TPUs without
  running them), here run with random parameters and images.

Each program runs in a process of its own (so the allocator's peak is its own) and is timed
over --steps calls after two untimed ones, the calls queued back to back and the clock read
after the last result is ready. Programs run in the order given by --only, each at each --batch
per device, until --budget seconds have passed (the rest are skipped and said so). The peer
needs diffusers 0.39 importable (bench/tpu_dry_run.py installs it into bench/.peer, put on
PYTHONPATH here as there). Each program's figures are printed as it finishes and written to
--out, one JSON line each; the last line printed is one JSON line with all of them and the
ratios ours / peer.

    python bench/gpu_run.py [--only ns1 vae peer] [--batch 8 32] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import tpu_dry_run  # noqa: E402  (the VAE programs both benches build)

from sigmavae_jax import parallel  # noqa: E402

PROGRAMS = ("ns1", "vae", "peer")


def random_like(abstract, rng: np.random.Generator, images: bool = False):
    """Random arrays with the shapes, dtypes and shardings of `abstract`: images uniform in
    [-1, 1], anything else normal with deviation 0.02, keys from seed 0."""

    def one(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), a.sharding)
        values = rng.uniform(-1, 1, a.shape) if images else rng.normal(0, 0.02, a.shape)
        return jax.device_put(values.astype(a.dtype), a.sharding)

    return jax.tree.map(one, abstract)


def timed(step, args, steps: int, carry_state: bool) -> dict:
    """Compile `step` for `args`, run it twice untimed and `steps` times timed. carry_state: the
    step returns (state, metrics) and takes its state back (donated) as the first argument."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def run(n, args):
        out = None
        for _ in range(n):
            out = compiled(*args)
            if carry_state:
                args = (out[0], *args[1:])
        jax.block_until_ready(out)
        return args

    args = run(2, args)
    start = time.perf_counter()
    run(steps, args)
    seconds = (time.perf_counter() - start) / steps
    stats = jax.devices()[0].memory_stats() or {}
    planned = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
    planned -= memory.alias_size_in_bytes
    return {
        "compile_s": round(compile_s, 1),
        "s_per_step": seconds,
        "planned_bytes": int(planned),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def one_device_mesh():
    """The mesh of the first device this process sees."""
    return parallel.make_mesh(devices=jax.devices()[:1])


def ns1(per_device: int, steps: int, rng: np.random.Generator) -> dict:
    from sigmavae_jax.models.lpips import lpips_weight_shapes, save_lpips_weights
    from sigmavae_jax.train.program import build_program
    from sigmavae_jax.train.state import create_state

    weights = {k: rng.normal(0, 0.05, shape).astype(np.float32) for k, shape in lpips_weight_shapes().items()}
    path = save_lpips_weights(pathlib.Path(tempfile.mkdtemp()) / "lpips_random.npz", weights)
    mesh = one_device_mesh()
    cfg = tpu_dry_run.ns1_config(per_device * mesh.size, [f"loss.lpips_weights={path}"])
    program = build_program(cfg, mesh)
    state, _ = create_state(cfg, program.modules, mesh, jax.random.key(0))
    images = random_like(program.abstract_batch(), rng, images=True)
    return timed(program.step, (state, images, program.lpips_vars), steps, carry_state=True)


def vae(per_device: int, steps: int, rng: np.random.Generator) -> dict:
    mesh = one_device_mesh()
    return _vae_like(*tpu_dry_run._vae_program(tpu_dry_run.sd_vae(mesh), mesh, per_device), steps, rng)


def peer(per_device: int, steps: int, rng: np.random.Generator) -> dict:
    mesh = one_device_mesh()
    return _vae_like(*tpu_dry_run._peer_program(mesh, per_device), steps, rng)


def _vae_like(jitted, args, steps: int, rng: np.random.Generator) -> dict:
    params, images, key = args
    concrete = (random_like(params, rng), random_like(images, rng, images=True), random_like(key, rng))
    return timed(jitted, concrete, steps, carry_state=False)


BUILDERS = {"ns1": ns1, "vae": vae, "peer": peer}


def run_one(name: str, per_device: int, steps: int, timeout: float) -> dict:
    """One program in a process of its own (its own allocator peak; a crash or an out-of-memory
    stays there): its figures, or {"error": ...}."""
    env = dict(os.environ)
    if name == "peer" and tpu_dry_run.PEER_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tpu_dry_run.PEER_DIR), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--one", name, str(per_device), "--steps", str(steps)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32], help="images per device")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per program")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no program starts")
    parser.add_argument("--out", type=pathlib.Path, help="also write each program's figures here, a JSON line each")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "PER_DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, per_device = args.one[0], int(args.one[1])
        figures = BUILDERS[name](per_device, args.steps, np.random.default_rng(0))
        figures["images_per_s"] = per_device / figures["s_per_step"]
        figures["device"] = jax.devices()[0].device_kind
        print(json.dumps(figures))
        return
    # This process never touches the device: JAX's allocator would take 75% of its memory here,
    # away from the processes that run the programs.
    start = time.perf_counter()
    results = {}
    for batch in args.batch:
        for name in args.only:
            key = f"{name}_{batch}"
            left = args.budget - (time.perf_counter() - start)
            if left <= 0:
                print(f"{key}: skipped (past --budget {args.budget:.0f} s)", flush=True)
                continue
            figures = run_one(name, batch, args.steps, timeout=left + 120)
            if "error" in figures:
                print(f"{key}: failed: {figures['error']}", flush=True)
                continue
            results[key] = figures
            line = json.dumps({"program": key, **figures})
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(line + "\n")
    devices = sorted({figures.pop("device") for figures in results.values()})
    summary = {"devices": devices, "jax": jax.__version__, **results}
    for batch in args.batch:
        ours, theirs = results.get(f"vae_{batch}"), results.get(f"peer_{batch}")
        if ours and theirs:
            summary[f"vae_time_vs_peer_{batch}"] = ours["s_per_step"] / theirs["s_per_step"]
            summary[f"vae_planned_memory_vs_peer_{batch}"] = ours["planned_bytes"] / theirs["planned_bytes"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
