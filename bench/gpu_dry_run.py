"""The GPU programs, measured by compiling them on this host (bf16, 256 x 256, no GPU needed):
HBM per GPU at 8 images, the largest batch per GPU that fits, FLOPs per image and the
compute-roofline images/s per GPU, for H100 and H200 unless --gpus says otherwise.

- ns1: the NextStep-1 fine-tune step (configs/nextstep1_f8c16.yaml), default settings.
- vae: the SD-config VAE forward and backward (L1 + 1e-6 KL on a posterior sample), as
  bench/tpu_dry_run.py compiles it.

Each compile is `bench/tpu_dry_run.py --one` in a process of its own with the CUDA compiler
plugin on its PYTHONPATH (<venv>/gpu-plugin from `make setup`, or --plugin; not needed when
`pip install -e '.[gpu]'` put it in this environment). The GPU compiler gives memory but no
cost analysis, so FLOPs are XLA's count of the same program lowered for one CPU device, and
the roofline is the compute term alone (an upper bound: no bytes figure, no memory term).
The largest batch is predicted from the per-image slope of the HBM total between 8 and 16 per
GPU and confirmed by compiling it (stepping down while it does not fit): three or four
compiles per program and GPU (docs/performance.md has their times). Ends with one JSON line.

    python bench/gpu_dry_run.py [--gpus h100 h200 a100-80gb b200] [--only ns1 vae] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import pathlib
import sys
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tpu_dry_run  # noqa: E402  (the one-compile machinery both benches share)

PROGRAMS = ("ns1", "vae")
BATCHES = (8, 16)  # per GPU: the reported batch, and the second point of the memory slope


def plugin_path(given: str | None) -> tuple[str, ...]:
    """The folder to put on the compiles' PYTHONPATH for the CUDA compiler plugin; none when
    this environment has it. Exits with what to run when there is none."""
    if given:
        return (given,)
    plugins = importlib.util.find_spec("jax_plugins")  # the namespace package JAX finds plugins in
    if plugins is not None and any(
        (pathlib.Path(p) / "xla_cuda12").is_dir() for p in plugins.submodule_search_locations
    ):
        return ()
    default = pathlib.Path(sys.prefix) / "gpu-plugin"
    if (default / "jax_plugins" / "xla_cuda12").is_dir():
        return (str(default),)
    sys.exit(
        f"error: no CUDA compiler plugin in this environment or in {default}; run make setup, or "
        "pip install -e '.[gpu]', or pass --plugin DIR"
    )


def predicted_largest(at: dict[int, dict]) -> int:
    """The largest batch under MARGIN x memory on the line through the first two measured totals."""
    (b1, f1), (b2, f2) = sorted(at.items())[:2]
    slope = (f2["hbm_total"] - f1["hbm_total"]) / (b2 - b1)
    fixed = f1["hbm_total"] - slope * b1
    return max(1, int((tpu_dry_run.MARGIN * f1["hbm_capacity"] - fixed) // slope))


def fitting_at_or_below(guess: int, compile_at: Callable[[int], dict], at: dict[int, dict]) -> int:
    """Compile at `guess` (compile_at(batch) -> figures, recorded in `at`), stepping down by about
    a sixteenth while it does not fit; returns the last batch compiled (1 at the least, whether or
    not it fits: its figures say)."""
    result = at[guess] = compile_at(guess)
    while not result["fits"] and guess > 1:
        guess = max(1, guess - max(1, guess // 16))
        result = at[guess] = compile_at(guess)
    return guess


def largest(name: str, gpu: str, at: dict[int, dict], extra: tuple[str, ...]) -> int:
    """The largest batch per GPU: predicted from the slope between 8 and 16, then compiled;
    stepped down while it does not fit. When it fits, the line through 8 and the confirmed
    point predicts again, and a larger prediction is compiled once more."""
    guess = fitting_at_or_below(predicted_largest(at), lambda batch: tpu_dry_run.run_one(name, gpu, batch, extra), at)
    if not at[guess]["fits"]:
        return 0
    refined = predicted_largest({b: at[b] for b in (BATCHES[0], guess)})
    if refined > guess:
        again = at[refined] = tpu_dry_run.run_one(name, gpu, refined, extra)
        if again["fits"]:
            return refined
    return guess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", nargs="+", default=["h100", "h200"], help="GPU models (sigmavae_jax.topology.GPUS)")
    parser.add_argument("--only", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    parser.add_argument("--jobs", type=int, default=2, help="compiles at a time (each its own process)")
    parser.add_argument("--plugin", help="a folder holding the CUDA compiler plugin (pip install --target)")
    args = parser.parse_args()
    extra = plugin_path(args.plugin)
    start = time.perf_counter()
    keys = [(name, gpu) for gpu in args.gpus for name in args.only]
    figures: dict[tuple[str, str], dict[int, dict]] = {key: {} for key in keys}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(key, b): pool.submit(tpu_dry_run.run_one, *key, b, extra) for key in keys for b in BATCHES}
        for (key, b), job in jobs.items():
            figures[key][b] = job.result()
        found = {key: pool.submit(largest, *key, figures[key], extra) for key in keys}
        best = {key: job.result() for key, job in found.items()}
    print(f"\n{time.perf_counter() - start:.0f} s of compiles\n")

    print(
        f"| program, GPU | HBM at {BATCHES[0]}/GPU (of what JAX takes) | largest batch/GPU (compiled) | TFLOP/image "
        "| compute-roofline images/s/GPU |"
    )
    print("|---|---|---|---|---|")
    summary = {}
    for name, gpu in keys:
        at8 = figures[(name, gpu)][BATCHES[0]]
        print(
            f"| {name}, {gpu} | {at8['hbm_total'] / 2**30:.2f} GiB (of {at8['hbm_capacity'] / 2**30:.2f}) "
            f"| {best[(name, gpu)]} | {at8['flops_per_image'] / 1e12:.3f} "
            f"| {at8['roofline_images_per_s_per_chip']:.1f} |"
        )
        prefix = f"{name}_{gpu.replace('-', '_')}"
        summary.update(
            {
                f"{prefix}_hbm_at_8_per_gpu": at8["hbm_total"],
                f"{prefix}_max_batch_per_gpu": best[(name, gpu)],
                f"{prefix}_flops_per_image": at8["flops_per_image"],
                f"{prefix}_compute_roofline_images_per_s_per_gpu": at8["roofline_images_per_s_per_chip"],
            }
        )
    print(
        json.dumps({"gpus": args.gpus, "memory_fraction": figures[keys[0]][BATCHES[0]]["memory_fraction"], **summary})
    )


if __name__ == "__main__":
    main()
