"""What the benchmarks share: timing, the torch twin of a model, the matmul roofline."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of `first` and `second`, timed turn by turn so both see the same machine
    state (clock, other load). Each timed call follows an untimed call of the same function:
    the first XLA call after a torch call runs ~8% slower (the SD VAE fwd+bwd, 8.3 s against
    7.6 s), and a training loop or an encode loop repeats one function."""
    a, b = [], []
    for _ in range(repeats):
        first()
        a.append(median_time(first, 1))
        second()
        b.append(median_time(second, 1))
    return statistics.median(a), statistics.median(b)


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_synced(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn`, then wait for the GPU (torch launches asynchronously), so timings are complete."""
    import torch

    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def torch_twin(cfg, params):
    """diffusers' torch AutoencoderKL holding the same weights as our model (`params`), on the
    GPU when there is one."""
    import torch
    from diffusers import AutoencoderKL

    from sigmavae_jax.convert import diffusers_config, to_diffusers_state_dict

    twin = AutoencoderKL(**diffusers_config(cfg))
    state = {
        k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_diffusers_state_dict(params, cfg).items()
    }  # writable copies
    twin.load_state_dict(state)
    return twin.to(torch_device())


def vae_fwd_bwd(model):
    """(jitted grads(state, x, key), state): the VAE-only forward and backward, L1 + 1e-6 * KL
    on a posterior sample (no sigma noise), the model's share of a training step."""
    from flax import nnx

    from sigmavae_jax import losses

    graph, state = nnx.split(model)

    @jax.jit
    def grads(state, x, key):
        def loss_fn(state):
            vae = nnx.merge(graph, state)
            posterior = vae.posterior(x)
            x_hat = vae.decode(posterior.sample(key))
            return jnp.mean(jnp.abs(x - x_hat)) + 1e-6 * losses.kl_loss(posterior.kl())

        return jax.grad(loss_fn)(state)

    return grads, state


def matmul_roofline(dtype=jnp.float32, repeats: int = 3) -> float:
    """The best GFLOP/s XLA reaches on large matrix products of `dtype` on this device: the
    ceiling a convolution network can approach (its convolutions are matrix products)."""
    shapes = [(4096, 2304, 256), (16384, 1152, 128), (2048, 2048, 2048)]
    if jax.devices()[0].platform != "cpu":  # an accelerator needs a larger product to reach its peak
        shapes.append((8192, 8192, 8192))
    best = 0.0
    for m, k, n in shapes:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(m, k)), dtype)
        b = jnp.asarray(np.random.default_rng(1).normal(size=(k, n)), dtype)
        product = jax.jit(jnp.matmul)
        jax.block_until_ready(product(a, b))
        seconds = median_time(lambda: jax.block_until_ready(product(a, b)), repeats)
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def flops(fn: Callable, *args) -> float:
    """FLOPs of `fn(*args)` by XLA's count of the program lowered for one CPU device, whatever
    device runs it (the convention of `dry_run.LOWERED_ON_CPU`): the GPU compiler's own cost
    analysis leaves out its convolutions, which it hands to cuDNN. `args`: arrays or
    ShapeDtypeStructs; only their shapes and dtypes are read."""
    from sigmavae_jax import dry_run

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    lowered = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",))
    return float(dry_run.cost_of(lowered).get("flops", 0.0))


def peak_bytes(compiled) -> int:
    """XLA's planned peak: arguments + outputs + temporaries of a compiled program."""
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
