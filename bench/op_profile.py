"""Where the VAE's forward+backward spends its time (prints tables, ends with one JSON line).

Two views of the SD-size VAE fwd+bwd (L1 + KL, the model's share of a training step):
  * the whole program under jax.profiler (with --step: the whole G+D training step instead):
    the time of every XLA op, summed by kind (convolution forward, input gradient, kernel
    gradient, matrix products, layout copies, reductions, other elementwise) and by shape;
  * with --layers, every distinct convolution of the model alone: forward, input-gradient and
    kernel-gradient GFLOP/s in JAX and in torch (same shapes, same threads), weighted by how
    often the model uses it.
Op times are summed over XLA's threads, which run independent ops side by side: their sum
exceeds the wall time by the printed factor. On a GPU the times are the device's kernels, named
by the HLO op each ran for (cuDNN's convolutions and cuBLAS's products are custom calls, sorted
by their targets), and the factor is the share of the wall time the GPU was running kernels.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import median_time, vae_fwd_bwd  # noqa: E402

from sigmavae_jax import api, kernels  # noqa: E402
from sigmavae_jax.config import load_config  # noqa: E402

# an instruction: name, shape (an array, or a tuple such as a library call's (result, scratch)),
# opcode, the rest of the line
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ([\w-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
_RUNTIME_EVENTS = ("ThunkExecutor", "end:", "Threadpool", "SlinkyThreadPool")
# XLA:GPU's library calls, by what they compute
_LIBRARY_KINDS = {
    "__cudnn$convForward": "conv forward",
    "__cudnn$convBiasActivationForward": "conv forward",
    "__cudnn$convBackwardInput": "conv input gradient",
    "__cudnn$convBackwardFilter": "conv kernel gradient",
    "__cublas$gemm": "matrix product",
    "__cublas$lt$matmul": "matrix product",
}


def _dims(shape: str) -> list[int]:
    """'f32[2,64,64,256]{3,2,1,0}' -> [2, 64, 64, 256]."""
    inner = shape.split("[", 1)[1].split("]", 1)[0] if "[" in shape else ""
    return [int(d) for d in inner.split(",") if d]


class HloOps:
    """The kind and operand shapes of each instruction of a compiled program, from its text."""

    def __init__(self, hlo_text: str):
        self.bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
        self.ops, self.targets, self.arguments = {}, {}, {}
        for name, shape, opcode, rest in _INSTRUCTION.findall(hlo_text):
            called = re.search(r"calls=%([\w.\-]+)", rest)
            source = re.search(r'op_name="([^"]+)"', rest)  # the jax op it came from
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            self.ops[name] = (
                re.sub(r"\{[^{}]*\}", "", shape),  # without layouts
                opcode,
                called.group(1) if called else None,
                source.group(1) if source else "",
            )
            self.targets[name] = target.group(1) if target else None
            self.arguments[name] = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        # XLA:GPU names a kernel after its op with '.' and '-' made '_'
        self.by_kernel_name = {re.sub(r"[.\-]", "_", name): name for name in self.ops}
        # a conv whose result has the dims of a 4-d program input (a kernel), in any order, is a
        # kernel gradient: XLA writes them as HWIO or as (O, kh, kw, I)
        entry = self.bodies.get("ENTRY", "")
        self.kernel_dims = {
            tuple(sorted(_dims(shape))) for shape in re.findall(r"= (\S+) parameter\(", entry) if len(_dims(shape)) == 4
        }

    def kind(self, name: str) -> str:
        shape, opcode, called, source = self.ops[name]
        if self.targets[name] in _LIBRARY_KINDS:
            return _LIBRARY_KINDS[self.targets[name]]
        body = self.bodies.get(called, "") if called else ""
        if opcode == "convolution" or "convolution(" in body:
            if tuple(sorted(_dims(shape))) in self.kernel_dims:
                return "conv kernel gradient"
            return "conv input gradient" if "transpose(" in source else "conv forward"  # transpose: a VJP
        if opcode == "dot" or "dot(" in body:
            return "matrix product"
        if "transpose" in name or opcode in ("copy", "transpose"):
            return "layout copy"
        if opcode == "reduce" or "reduce(" in body:
            return "reduction"
        return "elementwise"

    def operands(self, name: str) -> str:
        shape, _, called, _ = self.ops[name]
        if called:
            params = re.findall(r"%param_[\w.]+ = (\S+) parameter", self.bodies.get(called, ""))
        else:  # a library call: its arguments' shapes
            params = [self.ops[a][0] for a in self.arguments[name] if a in self.ops]
        return f"{' '.join(p.split('{')[0] for p in params[:2])} -> {shape}"

    def op_of(self, event) -> str | None:
        """The op a profiler event ran for: its `hlo_op` stat (or one in an annotation), else its
        own name or kernel name; None for runtime events."""
        if event.name.startswith(_RUNTIME_EVENTS):
            return None
        for key, value in event.stats:
            named = value if key == "hlo_op" else _annotated_op(value)
            if named in self.ops:
                return named
        return event.name if event.name in self.ops else self.by_kernel_name.get(event.name)


def _annotated_op(value) -> str | None:
    found = re.search(r"hlo_op=([\w.\-]+)", value) if isinstance(value, str) else None
    return found.group(1) if found else None


def op_seconds(trace, hlo: HloOps) -> tuple[collections.Counter, float]:
    """(seconds per op, seconds of events no op was found for) of a profiled run. On a GPU:
    the kernels on its planes (the "XLA Ops" line where the profile has one, else its streams),
    whose unnamed time is printed; on a CPU: the ops on the host's threads."""
    gpu = [plane for plane in trace.planes if plane.name.startswith("/device:GPU")]
    seconds, unnamed = collections.Counter(), 0.0
    for plane in gpu or trace.planes:
        lines = list(plane.lines)
        if gpu:
            lines = [line for line in lines if line.name == "XLA Ops"] or [
                line for line in lines if line.name.startswith("Stream")
            ]
        for line in lines:
            for event in line.events:
                op = hlo.op_of(event)
                if op is not None:
                    seconds[op] += event.duration_ns / 1e9
                elif gpu:
                    unnamed += event.duration_ns / 1e9
    return seconds, unnamed


def program_profile(label: str, compiled, run, top: int) -> dict[str, float]:
    """Wall time of `run()` (which executes `compiled`) and its XLA op times by kind and shape."""
    run()
    wall_s = median_time(run, 3)
    hlo = HloOps(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        trace = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))))
    by_kind, by_shape, count = collections.Counter(), collections.Counter(), collections.Counter()
    seconds, unnamed = op_seconds(trace, hlo)
    for op, op_s in seconds.items():
        kind = hlo.kind(op)
        by_kind[kind] += op_s
        by_shape[(kind, hlo.operands(op))] += op_s
        count[(kind, hlo.operands(op))] += 1
    total = sum(by_kind.values())
    print(
        f"\n{label}: {wall_s:.2f} s wall; op time {total:.2f} s summed over threads "
        f"({total / wall_s:.2f}x the wall time)"
        + (f"; {unnamed:.3f} s of kernels not named by an op" if unnamed else "")
    )
    for kind, seconds in by_kind.most_common():
        print(f"  {kind:22s} {seconds:7.3f} s  {seconds / total:6.1%}")
    print(f"\nThe {top} costliest (kind, operands -> result) groups:")
    for (kind, operands), seconds in by_shape.most_common(top):
        print(f"  {seconds * 1e3:8.1f} ms  x{count[(kind, operands)]:<3d} {kind:22s} {operands}")
    return {"wall_s": wall_s, **{f"share_{k.replace(' ', '_')}": v / total for k, v in by_kind.items()}}


def vae_program(cfg_name: str, size: int, batch: int, dtype: str = "float32"):
    """(compiled VAE fwd+bwd, run) on a fixed random batch, computing in `dtype`."""
    grads, state = vae_fwd_bwd(api.build_model(load_config(cfg_name).model, seed=0, dtype=dtype))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    key = jax.random.key(0)
    compiled = grads.lower(state, x, key).compile()
    return compiled, lambda: jax.block_until_ready(compiled(state, x, key))


# The convolutions of the SD VAE at a 128 x 128 input: (input size, C_in, C_out, kernel, kind, uses)
SD_CONVS_AT_128 = [
    (128, 3, 128, 3, "same", 1),
    (128, 128, 128, 3, "same", 9),
    (128, 128, 128, 3, "down", 1),
    (128, 256, 128, 3, "same", 1),
    (128, 256, 128, 1, "same", 1),
    (128, 128, 3, 3, "same", 1),
    (64, 128, 256, 3, "same", 1),
    (64, 256, 256, 3, "same", 8),
    (64, 128, 256, 1, "same", 1),
    (64, 256, 256, 3, "down", 1),
    (64, 512, 256, 3, "same", 1),
    (64, 512, 256, 1, "same", 1),
    (64, 256, 256, 3, "up", 1),
    (32, 256, 512, 3, "same", 1),
    (32, 512, 512, 3, "same", 9),
    (32, 256, 512, 1, "same", 1),
    (32, 512, 512, 3, "down", 1),
    (32, 512, 512, 3, "up", 1),
    (16, 512, 512, 3, "same", 18),
    (16, 512, 512, 3, "up", 1),
    (16, 512, 8, 3, "same", 1),
    (16, 4, 512, 3, "same", 1),
]


def _jax_conv(kind: str, c_in: int, c_out: int, k: int):
    """(x, kernel) -> the conv as the model computes it on CPU (its own conv and Downsample
    modules with the CPU kernels, the CPU nearest-x2 conv)."""
    from flax import nnx

    from sigmavae_jax.models import layers

    if kind == "up":
        return kernels.CPU.upsampled_conv
    rngs = nnx.Rngs(0)
    if kind == "down":
        conv = layers.Downsample(c_in, dtype=jnp.float32, kernels=kernels.CPU, rngs=rngs).conv
    else:
        conv = layers.conv(c_in, c_out, k, dtype=jnp.float32, kernels=kernels.CPU, rngs=rngs)
    return functools.partial(layers.conv_with_kernel, conv)


def _torch_conv(kind: str, k: int):
    import torch.nn.functional as F

    if kind == "up":
        return lambda x, w: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    if kind == "down":
        return lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2)
    return lambda x, w: F.conv2d(x, w, padding=k // 2)


def layer_profile(batch: int) -> dict[str, float]:
    """Forward / input-gradient / kernel-gradient GFLOP/s of each conv, JAX (as the model runs
    it) against torch; torch's gradients are its backward time less its forward."""
    import torch

    names = ("forward", "input grad", "kernel grad")
    totals = {f"{side}_{n}": 0.0 for side in ("jax", "torch") for n in names}
    print(f"\nEach convolution alone, batch {batch}: GFLOP/s JAX | torch (forward, input grad, kernel grad)")
    for size, c_in, c_out, k, kind, uses in SD_CONVS_AT_128:
        rng = np.random.default_rng(0)
        out = size * 2 if kind == "up" else size // 2 if kind == "down" else size
        x, w = rng.normal(size=(batch, size, size, c_in)), rng.normal(size=(k, k, c_in, c_out)) * 0.05
        dy = rng.normal(size=(batch, out, out, c_out))
        fn = _jax_conv(kind, c_in, c_out, k)
        xj, wj, dyj = (jnp.asarray(a, jnp.float32) for a in (x, w, dy))
        programs = (
            jax.jit(fn),
            jax.jit(lambda x, w, dy: jax.vjp(lambda x: fn(x, w), x)[1](dy)[0]),
            jax.jit(lambda x, w, dy: jax.vjp(lambda w: fn(x, w), w)[1](dy)[0]),
        )
        arguments = ((xj, wj), (xj, wj, dyj), (xj, wj, dyj))
        jax_s = []
        for program, args in zip(programs, arguments):
            jax.block_until_ready(program(*args))
            jax_s.append(median_time(lambda: jax.block_until_ready(program(*args)), 5))
        tfn = _torch_conv(kind, k)
        xt, wt, dyt = (
            torch.from_numpy(np.ascontiguousarray(a.transpose(*axes), np.float32))
            for a, axes in ((x, (0, 3, 1, 2)), (w, (3, 2, 0, 1)), (dy, (0, 3, 1, 2)))
        )
        with torch.no_grad():
            tfn(xt, wt)
            forward_s = median_time(lambda: tfn(xt, wt), 5)
        x_grad, w_grad = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        backward = (
            (lambda: torch.autograd.grad(tfn(x_grad, wt), x_grad, dyt)),
            (lambda: torch.autograd.grad(tfn(xt, w_grad), w_grad, dyt)),
        )
        torch_s = [forward_s]
        for fn_ in backward:
            fn_()
            torch_s.append(max(median_time(fn_, 5) - forward_s, 1e-9))
        gflop = 2 * batch * out * out * c_in * c_out * k * k / 1e9
        rates = lambda seconds: " ".join(f"{gflop / s:5.0f}" for s in seconds)  # noqa: E731
        print(f"  {kind:4s} {k}x{k} {c_in:3d}->{c_out:3d} at {size:3d} x{uses:<2d}  {rates(jax_s)} | {rates(torch_s)}")
        for n, j, t in zip(names, jax_s, torch_s):
            totals[f"jax_{n}"] += uses * j
            totals[f"torch_{n}"] += uses * t
    print(
        "  seconds, weighted by use: "
        + ", ".join(f"{n} JAX {totals[f'jax_{n}']:.2f} torch {totals[f'torch_{n}']:.2f}" for n in names)
    )
    return {f"layers_{k.replace(' ', '_')}_s": v for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd", help="model config name (default: sd)")
    parser.add_argument("--size", type=int, default=128, help="image size (default: 128, as bench/train_step.py)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=20, help="how many (kind, shape) groups to list")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--layers", action="store_true", help="also time each SD convolution alone against torch (128 x 128 shapes)"
    )
    parser.add_argument(
        "--step", action="store_true", help="profile the whole G+D training step instead of the VAE fwd+bwd"
    )
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    shape = f"{args.config}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}"
    if args.step:
        from train_step import compiled_step, lpips_for_timing

        overrides = [
            "loss.disc_start=0",
            f"train.image_size={args.size}",
            f"train.batch_size={args.batch}",
            f"train.compute_dtype={args.dtype}",
        ]
        compiled, _, run, _ = compiled_step(args.config, overrides, lpips_for_timing())
        result = program_profile(f"G+D step ({shape})", compiled, run, args.top)
    else:
        compiled, run = vae_program(args.config, args.size, args.batch, args.dtype)
        result = program_profile(f"VAE fwd+bwd ({shape})", compiled, run, args.top)
    if args.layers:
        result.update(layer_profile(args.batch))
    print(json.dumps({name: round(value, 4) for name, value in result.items()}))


if __name__ == "__main__":
    main()
