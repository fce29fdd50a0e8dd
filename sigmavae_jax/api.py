"""`sigmavae_jax.load(path)`: a ready codec with jit-compiled encode/decode.

codec = sigmavae_jax.load("out/flux")          # a params export (convert_torch_weights.py)
z = codec.encode(x)                             # x: (B, H, W, 3) in [-1, 1] -> (B, H/8, W/8, 16)
x_hat = codec.decode(z)
# inside your own jit: pure functions of (params, input)
step = jax.jit(lambda p, x: codec.encode_fn(p, x))
z = step(codec.params, x)
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmavae_jax.checkpoint import load_params
from sigmavae_jax.config import Config, ModelConfig
from sigmavae_jax.kernels import XLA, Kernels
from sigmavae_jax.models import latent
from sigmavae_jax.models.autoencoder import AutoencoderKL, check_image_shape, check_latent_shape
from sigmavae_jax.models.params import (  # noqa: F401 (the user-facing names of the parameter tree)
    DTYPES,
    abstract_model,
    build_model,
    check_params,
    expected_params,
    flatten_params,
    local_kernels,
    params_of,
    unflatten_params,
)
from sigmavae_jax.tiling import Tiling, tile_passes, tiled_apply


def check_floating(x, want: str, fix: str) -> None:
    """Raises TypeError unless `x` (an array, a tracer or anything np.asarray takes) has a real
    floating dtype (float16/32/64, bfloat16, ...): integer, bool or complex input would be
    computed on silently and give garbage. Reads only the dtype, so tracers under jit, grad or
    jvp pass through."""
    # jax.Array covers tracers; anything else (lists, torch tensors) says its dtype via numpy
    dtype = x.dtype if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):  # unlike np.issubdtype, knows bfloat16
        raise TypeError(f"{want} (float32, bfloat16, float16 or float64); got dtype {dtype}. {fix}")


def check_path_type(
    path, accepted: str = "a params export path (str or os.PathLike, local or gs://bucket/...)"
) -> None:
    """Raises TypeError unless `path` is a str or os.PathLike, and ValueError for an empty one
    (which pathlib would take as the working directory), naming what was given and `accepted`,
    before pathlib turns it into an error that names neither."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected {accepted}; got {path!r} of type {type(path).__name__}")
    if not os.fspath(path).strip():
        raise ValueError(f"expected {accepted}; got an empty path {os.fspath(path)!r}")


@dataclasses.dataclass(frozen=True)
class Codec:
    """A loaded VAE. `encode`/`decode`/`reconstruct` are jit-compiled; `encode_fn(params, x)`
    and `decode_fn(params, z)` are the same computations as pure functions for your own jit.

    Images are NHWC floats in [-1, 1]; latents are NHWC, unscaled (`scale` maps them to what a
    diffusion model sees, `unscale` back). `encode`, `decode` and `reconstruct` check their whole
    input before computing: TypeError for a dtype that is not a real float (uint8, int, bool,
    complex), ValueError for a wrong shape. Values are not checked (floats outside [-1, 1] go
    through), and inputs may be tracers (the checks read only dtype and shape).
    """

    config: Config
    graphdef: Any
    params: Any  # nnx.State of the parameters: a pytree you can pass through jit
    dtype: Any

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    tiling: Tiling = Tiling()
    kernels: Kernels = XLA  # the model's; also how batches go through on CPU

    def _apply(self, method: str | Callable) -> Callable:
        """A pure function (params, x) of the model's `method` (a name, or model, x -> y)."""

        def fn(params, x):
            model = nnx.merge(self.graphdef, params)
            return method(model, x) if callable(method) else getattr(model, method)(x)

        return fn

    def _tile_functions(self, method: Callable) -> tuple[Callable, Callable]:
        """(record, apply) of `tiling.tiled_apply` for the model's local part `method`, with
        this codec's parameters (`tiling.tile_passes`)."""
        record, apply = tile_passes(self.graphdef, method)
        return (lambda *tile: record(self.params, *tile)), (lambda *tile: apply(self.params, *tile))

    @property
    def encode_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        return self._apply("encode")

    @property
    def decode_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        return self._apply("decode")

    @property
    def reconstruct_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        return lambda params, x: self.decode_fn(params, self.encode_fn(params, x))

    def __post_init__(self):
        jitted = {
            "_encode": self.kernels.batch_map(self.encode_fn),
            "_decode": self.kernels.batch_map(self.decode_fn),
            "_reconstruct": self.kernels.batch_map(self.reconstruct_fn),
            "_encode_global": self._apply(lambda m, h: m.posterior_from_features(h).mode()),
            "_decode_global": self._apply("decode_bottleneck"),
        }
        for name, fn in jitted.items():
            object.__setattr__(self, name, jax.jit(fn))
        dtype = self.dtype
        object.__setattr__(
            self, "_encode_tiles", self._tile_functions(lambda m, x: m.encoder.downsample_features(x.astype(dtype)))
        )
        object.__setattr__(self, "_decode_tiles", self._tile_functions(lambda m, h: m.decode_from_bottleneck(h)))

    def with_tiling(self, mode: str = "always", **settings) -> "Codec":
        """This codec with other tiling settings (see `tiling.Tiling`), e.g.
        `codec.with_tiling("always", size=256, overlap=64)`; `with_tiling("never")` turns it off."""
        return dataclasses.replace(self, tiling=dataclasses.replace(self.tiling, mode=mode, **settings))

    def _tiled(self, tiles: tuple[Callable, Callable], x: np.ndarray, tile: int, overlap: int, scale) -> np.ndarray:
        record, apply = tiles
        return tiled_apply(
            apply,
            x,
            tile=tile,
            overlap=overlap,
            scale=scale,
            record=record if self.tiling.shared_stats else None,
            stat_sweeps=self.tiling.stat_sweeps,
        )

    def _check_images(self, x) -> tuple[int, ...]:
        """`x`'s shape, after the dtype and shape checks of `encode`."""
        check_floating(x, "images must be floats in [-1, 1]", "For uint8 pixels pass x / 127.5 - 1")
        shape = np.shape(x)
        check_image_shape(self.model_config, shape)
        return shape

    def encode(self, x) -> jax.Array:
        """(B, H, W, C) float image in [-1, 1] -> (B, H/f, W/f, z) posterior mode, unscaled.
        Large images go through in tiles (see `tiling`). Raises TypeError unless x is real
        floating point (for uint8 pixels pass x / 127.5 - 1), ValueError unless its shape is
        (B, H, W, in_channels) with H, W multiples of the model's spatial factor."""
        shape = self._check_images(x)
        if not self.tiling.applies(shape[1], shape[2]):
            return self._encode(self.params, jnp.asarray(x))
        f = self.model_config.downsample_factor
        self.tiling.check_multiple(f)
        features = self._tiled(
            self._encode_tiles, np.asarray(x, np.float32), self.tiling.size, self.tiling.overlap, Fraction(1, f)
        )
        return self._encode_global(self.params, jnp.asarray(features))

    def decode(self, z) -> jax.Array:
        """(B, h, w, z) unscaled float latent -> (B, h*f, w*f, C) image. Large images are made
        in tiles (see `tiling`). Raises TypeError unless z is real floating point, ValueError
        unless its shape is (B, h, w, z_channels)."""
        f = self.model_config.downsample_factor
        check_floating(z, "latents must be floats", "Pass them as encode returns them (or `unscale` scaled ones)")
        shape = np.shape(z)
        check_latent_shape(self.model_config, shape)
        if not self.tiling.applies(shape[1] * f, shape[2] * f):
            return self._decode(self.params, jnp.asarray(z))
        self.tiling.check_multiple(f)
        bottleneck = np.asarray(self._decode_global(self.params, jnp.asarray(z)), np.float32)
        image = self._tiled(
            self._decode_tiles, bottleneck, self.tiling.size // f, self.tiling.overlap // f, Fraction(f)
        )
        return jnp.asarray(image)

    def reconstruct(self, x) -> jax.Array:
        """decode(encode(x)): (B, H, W, C) float image in [-1, 1] -> the same shape, in one
        compiled call unless the image is tiled. Raises as `encode` does."""
        # checked here on the whole input: inside the batch map the model would see (and name)
        # one slice of it
        shape = self._check_images(x)
        if self.tiling.applies(shape[1], shape[2]):
            return self.decode(self.encode(x))
        return self._reconstruct(self.params, jnp.asarray(x))

    def scale(self, z) -> jax.Array:
        cfg = self.model_config
        return latent.scale_latent(jnp.asarray(z), cfg.scaling_factor, cfg.shift_factor)

    def unscale(self, z) -> jax.Array:
        cfg = self.model_config
        return latent.unscale_latent(jnp.asarray(z), cfg.scaling_factor, cfg.shift_factor)


def codec_from_model(model: AutoencoderKL, config: Config, tiling: Tiling = Tiling()) -> Codec:
    graphdef, params = nnx.split(model)
    return Codec(
        config=config, graphdef=graphdef, params=params, dtype=model.dtype, tiling=tiling, kernels=model.kernels
    )


def load(
    path: str | os.PathLike, *, dtype: str = "float32", tiling: Tiling | str = "auto", kernels: str = "auto"
) -> Codec:
    """Loads a params export (written by convert_torch_weights.py or train.py; a local path or
    gs://bucket/..., as a str or os.PathLike) as a Codec. Raises TypeError for another type of
    `path`, ValueError for an unknown dtype, FileNotFoundError if `path` is no params export.

    dtype: the compute dtype, "float32" or "bfloat16" (parameters stay as stored).
    tiling: "auto" (tile images above 1024 x 1024 pixels), "always", "never", or a `Tiling`.
    kernels: "auto" (those of this process's first device), "xla" or "cpu" (`sigmavae_jax.kernels`).
        The CPU kernels, which "auto" picks on a CPU host, take reverse-mode autodiff only;
        `jax.jvp` through them raises TypeError: use "xla" for forward mode.
    """
    check_path_type(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; use one of {sorted(DTYPES)}")
    tiling = tiling if isinstance(tiling, Tiling) else Tiling(tiling)
    params, config = load_params(path)
    return codec_from_model(build_model(config.model, params, dtype=dtype, kernels=kernels), config, tiling)
