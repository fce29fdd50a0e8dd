"""Benchmark of encode and decode (run by `make bench`; prints figures, ends with one JSON line).

Measures, in one run on this machine, for the SD config and the FLUX/NextStep-1 f8c16
architecture (the same network; NextStep-1 adds a cheap patch LayerNorm) at 256 x 256, batch
1 and 4, float32, on the same random weights:
  * JAX (our jit-compiled encode_fn/decode_fn) against diffusers' torch AutoencoderKL, timed
    turn by turn: images/s and the ratio (> 1: JAX faster);
  * achieved GFLOP/s (FLOPs from XLA's cost analysis of our program) and its fraction of the
    matmul roofline measured in the same run;
  * XLA's planned peak memory of each program;
  * a tiled 2048 x 2048 SD decode in a fresh process: seconds and peak RSS.
Targets (performance issue): ratio >= 1.25 for encode and decode; >= 85% of the roofline;
tiled 2048 x 2048 decode under 6 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import alternate, flops, matmul_roofline, peak_bytes, torch_device, torch_synced, torch_twin  # noqa: E402

from sigmavae_jax import api  # noqa: E402
from sigmavae_jax.config import Config, load_config  # noqa: E402

CONFIGS = {"sd": "sd", "f8c16": "flux"}  # label -> config (FLUX and NextStep-1 share the network)


def bench_codec(
    config: str, size: int, batch: int, repeats: int, roofline: float, dtype: str = "float32", peak_tflops: float = 0.0
) -> dict:
    import torch

    cfg = load_config(config).model
    model = api.build_model(cfg, seed=0, dtype=dtype)
    codec = api.codec_from_model(model, Config(model=cfg))
    twin = torch_twin(cfg, api.params_of(model)).eval()
    if dtype == "bfloat16":
        twin = twin.to(torch.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    # what codec.encode / codec.decode run (on CPU one image after another, see kernels.CPU)
    encode = jax.jit(codec.kernels.batch_map(codec.encode_fn)).lower(codec.params, x).compile()
    z = encode(codec.params, x)
    decode = jax.jit(codec.kernels.batch_map(codec.decode_fn)).lower(codec.params, z).compile()
    x_torch = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(torch_device(), twin.dtype)
    with torch.inference_mode():
        z_torch = twin.encode(x_torch).latent_dist.mode()

    @torch.inference_mode()
    def torch_encode():
        return twin.encode(x_torch).latent_dist.mode()

    @torch.inference_mode()
    def torch_decode():
        return twin.decode(z_torch).sample

    # FLOPs of one image's program times the batch: XLA's cost analysis counts a loop's body once
    per_image = {
        name: flops(fn, codec.params, arg[:1])
        for name, fn, arg in (("encode", codec.encode_fn, x), ("decode", codec.decode_fn, z))
    }
    result = {}
    for name, program, args, reference in (
        ("encode", encode, (codec.params, x), torch_encode),
        ("decode", decode, (codec.params, z), torch_decode),
    ):
        jax_s, torch_s = alternate(lambda: jax.block_until_ready(program(*args)), torch_synced(reference), repeats)
        gflops = per_image[name] * batch / jax_s / 1e9
        result[name] = {
            "jax_images_per_s": batch / jax_s,
            "torch_images_per_s": batch / torch_s,
            "ratio": torch_s / jax_s,
            "gflops": gflops,
            "roofline_fraction": gflops / roofline,
            "peak_gib": peak_bytes(program) / 2**30,
            "mfu": gflops / 1e3 / peak_tflops if peak_tflops else None,
        }
    return result


def peak_rss_kib() -> int:
    """This process's own peak resident set in KiB: Linux's VmHWM where there is one. getrusage's
    ru_maxrss is not used there: Linux carries the parent's peak into a child across fork and
    exec, so a child of a large parent reports the parent's size."""
    status = pathlib.Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


def tiled_decode_child(size: int) -> None:
    """Runs in a fresh process: decodes a random SD latent of a `size` x `size` image with the
    default tiling and prints seconds and this process's peak RSS as JSON."""
    cfg = load_config("sd").model
    codec = api.codec_from_model(api.build_model(cfg, seed=0), Config(model=cfg))
    z = np.random.default_rng(0).normal(size=(1, size // 8, size // 8, cfg.z_channels)).astype(np.float32)
    start = time.perf_counter()
    image = np.asarray(codec.decode(z))
    seconds = time.perf_counter() - start
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()
    peak_kib = peak_rss_kib()
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_kib / 2**20}))


def bench_tiled_decode(size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--tiled-decode-child", str(size)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the tiled {size} x {size} decode failed (status {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"labels among {sorted(CONFIGS)}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tiled-size", type=int, default=2048, help="tiled SD decode size (0: skip)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the chip's datasheet peak: also print MFU")
    parser.add_argument("--tiled-decode-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiled_decode_child:
        return tiled_decode_child(args.tiled_decode_child)
    # the tiled decode's own process runs first, before this one opens the device: on a GPU this
    # process's allocators (JAX's and torch's) keep what they took, which the child would need
    tiled = bench_tiled_decode(args.tiled_size) if args.tiled_size else None
    import torch

    roofline = matmul_roofline(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    print(
        f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  "
        f"{args.dtype} matmul roofline: {roofline:.0f} GFLOP/s"
    )
    result = {"roofline_gflops": roofline}
    for label in args.configs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            figures = bench_codec(
                CONFIGS[label], args.size, batch, args.repeats, roofline, args.dtype, args.peak_tflops
            )
            for name, f in figures.items():
                print(
                    f"{label:6s} {name} {args.size}x{args.size} batch {batch}: JAX {f['jax_images_per_s']:.2f} img/s, "
                    f"torch {f['torch_images_per_s']:.2f} img/s, ratio {f['ratio']:.2f} (target >= 1.25), "
                    f"{f['gflops']:.0f} GFLOP/s = {f['roofline_fraction']:.0%} of roofline (target >= 85%), "
                    f"XLA peak {f['peak_gib']:.2f} GiB" + (f", MFU {f['mfu']:.1%}" if f["mfu"] is not None else "")
                )
                key = f"{label}_{name}_b{batch}"
                result.update(
                    {
                        f"{key}_ratio_vs_torch": f["ratio"],
                        f"{key}_images_per_s": f["jax_images_per_s"],
                        f"{key}_roofline_fraction": f["roofline_fraction"],
                    }
                )
                if label == "sd" and batch == 1:
                    result[f"{name}_ratio_vs_torch"] = f["ratio"]
                    result[f"roofline_fraction_{name}"] = f["roofline_fraction"]
    if tiled:
        print(
            f"tiled SD decode {args.tiled_size}x{args.tiled_size}: {tiled['seconds']:.0f} s, "
            f"peak RSS {tiled['peak_rss_gib']:.2f} GiB (target < 6)"
        )
        result[f"tiled_decode_{args.tiled_size}_peak_rss_gib"] = tiled["peak_rss_gib"]
        result[f"tiled_decode_{args.tiled_size}_s"] = tiled["seconds"]
    print(json.dumps({name: round(value, 4) for name, value in result.items()}))


if __name__ == "__main__":
    main()
