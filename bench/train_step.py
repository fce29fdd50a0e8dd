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
from common import alternate, median_time, torch_twin  # noqa: E402

from sigmavae_jax import api, losses, parallel  # noqa: E402
from sigmavae_jax.config import load_config  # noqa: E402
from sigmavae_jax.models.lpips import load_lpips  # noqa: E402
from sigmavae_jax.train import state as train_state  # noqa: E402
from sigmavae_jax.train.step import compile_train_step, make_train_step  # noqa: E402


def bench_step(name: str, overrides: list[str], repeats: int, lpips) -> dict[str, float]:
    """Compile time and steady-state images/s of the full step for a config."""
    cfg = load_config(name, overrides)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    modules = train_state.build_modules(cfg)
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

    run()  # warm-up
    seconds = median_time(run, repeats)
    return {"compile_s": compile_s, "step_s": seconds, "images_per_s": batch / seconds}


def bench_vae_vs_torch(size: int, batch: int, repeats: int) -> dict[str, float]:
    """VAE-only fwd+bwd, L1 + 1e-6 * KL (posterior sample, no noise), JAX vs torch."""
    cfg = load_config("sd").model
    model = api.build_model(cfg, seed=0)
    params = api.params_of(model)
    torch_vae = torch_twin(cfg, params)
    torch_vae.train()
    x_np = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    graph, state = nnx.split(model)

    @jax.jit
    def jax_grads(state, x, key):
        def loss_fn(state):
            vae = nnx.merge(graph, state)
            posterior = vae.posterior(x)
            x_hat = vae.decode(posterior.sample(key))
            return jnp.mean(jnp.abs(x - x_hat)) + 1e-6 * losses.kl_loss(posterior.kl())

        return jax.grad(loss_fn)(state)

    x_jax, key = jnp.asarray(x_np), jax.random.key(0)
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

    def run_jax():
        jax.block_until_ready(jax_grads(state, x_jax, key))

    def run_torch():
        torch_vae.zero_grad(set_to_none=True)
        posterior = torch_vae.encode(x_torch).latent_dist
        x_hat = torch_vae.decode(posterior.sample()).sample
        loss = (x_torch - x_hat).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()

    jax_s, torch_s = alternate(run_jax, run_torch, repeats)
    return {"jax_s": jax_s, "torch_s": torch_s, "ratio": torch_s / jax_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny config only (seconds, for a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lpips = nnx.split(load_lpips(None))
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")

    tiny = bench_step("tiny", ["loss.disc_start=0"], args.repeats, lpips)
    print(f"tiny G+D step (64x64, batch 8):  compile {tiny['compile_s']:.1f} s, {tiny['images_per_s']:.1f} images/s")
    result = {"tiny_step_images_per_s": tiny["images_per_s"], "tiny_step_compile_s": tiny["compile_s"]}
    if not args.quick:
        sd_args = ["loss.disc_start=0", "train.image_size=128", "train.batch_size=2"]
        sd = bench_step("sd", sd_args, args.repeats, lpips)
        fixed = bench_step("sd", [*sd_args, "loss.adaptive_gan_weight=false"], args.repeats, lpips)
        overhead = 1.0 - fixed["step_s"] / sd["step_s"]  # negative: below the timing noise
        print(
            f"SD G+D step (128x128, batch 2):   compile {sd['compile_s']:.1f} s (target <= 60), "
            f"{sd['images_per_s']:.2f} images/s ({sd['step_s']:.2f} s/step)"
        )
        print(f"adaptive GAN weight overhead:     {overhead:.1%} of the step (target <= 10%; fixed weight {fixed['step_s']:.2f} s/step)")
        vae = bench_vae_vs_torch(128, 2, args.repeats)
        print(
            f"VAE fwd+bwd (SD, 128x128, batch 2, L1 + KL): JAX {vae['jax_s']:.2f} s, torch {vae['torch_s']:.2f} s, "
            f"ratio {vae['ratio']:.2f} (>1: JAX faster)"
        )
        result.update(
            {
                "vae_fwd_bwd_ratio_vs_torch": vae["ratio"],
                "vae_fwd_bwd_jax_s": vae["jax_s"],
                "vae_fwd_bwd_torch_s": vae["torch_s"],
                "adaptive_weight_overhead": overhead,
                "sd_step_compile_s": sd["compile_s"],
                "sd_step_images_per_s": sd["images_per_s"],
            }
        )
    print(json.dumps({name: round(value, 4) for name, value in result.items()}))


if __name__ == "__main__":
    main()
