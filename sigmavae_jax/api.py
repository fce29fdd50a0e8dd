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
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmavae_jax.checkpoint import load_params
from sigmavae_jax.config import Config, ModelConfig
from sigmavae_jax.models import latent
from sigmavae_jax.models.autoencoder import AutoencoderKL

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _abstract_model(cfg: ModelConfig, dtype) -> AutoencoderKL:
    return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def expected_params(cfg: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Every parameter of the model for `cfg`: flat path tuple -> shape/dtype, no memory used."""
    state = nnx.state(_abstract_model(cfg, jnp.float32), nnx.Param)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def flatten_params(params: dict[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested params dict -> {path tuple: array}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten_params(flat: dict[tuple, Any]) -> dict[Any, Any]:
    """{path tuple: array} -> nested params dict."""
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def check_params(params: dict[Any, Any], cfg: ModelConfig) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped params (up to 20 each)."""
    expected = expected_params(cfg)
    given = flatten_params(params)
    missing = [p for p in expected if p not in given]
    unexpected = [p for p in given if p not in expected]
    misshaped = [
        p for p in expected if p in given and tuple(np.shape(given[p])) != tuple(expected[p].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    name = lambda p: "/".join(map(str, p))  # noqa: E731
    lines = ["params do not fit the model config:"]
    for title, paths, show in (
        ("missing", missing, lambda p: f"{name(p)} expected {tuple(expected[p].shape)}"),
        ("unexpected", unexpected, lambda p: f"{name(p)} {tuple(np.shape(given[p]))}"),
        (
            "mis-shaped",
            misshaped,
            lambda p: f"{name(p)} got {tuple(np.shape(given[p]))}, expected {tuple(expected[p].shape)}",
        ),
    ):
        if paths:
            lines.append(f"  {len(paths)} {title}:")
            lines += [f"    {show(p)}" for p in paths[:20]]
            if len(paths) > 20:
                lines.append(f"    ... and {len(paths) - 20} more")
    raise ValueError("\n".join(lines))


def params_of(model: AutoencoderKL) -> dict[Any, Any]:
    """The model's parameters as a nested dict of arrays (list indices as ints)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def build_model(cfg: ModelConfig, params: dict[Any, Any] | None = None, *, dtype="float32", seed: int = 0):
    """An AutoencoderKL for `cfg`: randomly initialised (`seed`) or holding `params`."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if params is None:
        return AutoencoderKL(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    check_params(params, cfg)
    model = _abstract_model(cfg, dtype)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


@dataclasses.dataclass(frozen=True)
class Codec:
    """A loaded VAE. `encode`/`decode`/`reconstruct` are jit-compiled; `encode_fn(params, x)`
    and `decode_fn(params, z)` are the same computations as pure functions for your own jit.

    Images are NHWC floats in [-1, 1]; latents are NHWC, unscaled (`scale` maps them to what a
    diffusion model sees, `unscale` back).
    """

    config: Config
    graphdef: Any
    params: Any  # nnx.State of the parameters: a pytree you can pass through jit
    dtype: Any

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    def _apply(self, method: str) -> Callable:
        def fn(params, x):
            return getattr(nnx.merge(self.graphdef, params), method)(x)

        return fn

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
        object.__setattr__(self, "_encode", jax.jit(self.encode_fn))
        object.__setattr__(self, "_decode", jax.jit(self.decode_fn))
        object.__setattr__(self, "_reconstruct", jax.jit(self.reconstruct_fn))

    def encode(self, x) -> jax.Array:
        """(B, H, W, C) image in [-1, 1] -> (B, H/f, W/f, z) posterior mode, unscaled."""
        return self._encode(self.params, jnp.asarray(x))

    def decode(self, z) -> jax.Array:
        """(B, h, w, z) unscaled latent -> (B, h*f, w*f, C) image."""
        return self._decode(self.params, jnp.asarray(z))

    def reconstruct(self, x) -> jax.Array:
        return self._reconstruct(self.params, jnp.asarray(x))

    def scale(self, z) -> jax.Array:
        cfg = self.model_config
        return latent.scale_latent(jnp.asarray(z), cfg.scaling_factor, cfg.shift_factor)

    def unscale(self, z) -> jax.Array:
        cfg = self.model_config
        return latent.unscale_latent(jnp.asarray(z), cfg.scaling_factor, cfg.shift_factor)


def codec_from_model(model: AutoencoderKL, config: Config) -> Codec:
    graphdef, params = nnx.split(model)
    return Codec(config=config, graphdef=graphdef, params=params, dtype=model.dtype)


def load(path: str | pathlib.Path, *, dtype: str = "float32") -> Codec:
    """Loads a params export (written by convert_torch_weights.py or train.py) as a Codec.

    dtype: the compute dtype, "float32" or "bfloat16" (parameters stay as stored).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; use one of {sorted(DTYPES)}")
    params, config = load_params(path)
    return codec_from_model(build_model(config.model, params, dtype=dtype), config)
