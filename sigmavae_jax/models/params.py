"""The VAE's parameter tree: its dtype names, expected shapes, checks, flat and nested forms,
and models built from a config (randomly initialised, abstract, or holding given params).

Params are nested dicts of arrays keyed as NNX states are (list indices as ints), e.g.
`params["encoder"]["down"][0]["block"][1]["conv1"]["kernel"]`; the flat form keys each array
by its path tuple. Everything that reads or writes parameters (the codec, training, the
converters, checkpoints) goes through here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sigmavae_jax.config import ModelConfig
from sigmavae_jax.kernels import XLA, Kernels, select
from sigmavae_jax.messages import key_summary
from sigmavae_jax.models.autoencoder import AutoencoderKL
from sigmavae_jax.models.init_rngs import init_rngs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def abstract_model(cfg: ModelConfig, dtype, model_kernels: Kernels = XLA) -> AutoencoderKL:
    """The AutoencoderKL of `cfg` as shapes only (`nnx.eval_shape`): no memory, no random draws."""
    return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=init_rngs(0), dtype=dtype, kernels=model_kernels))


def local_kernels(setting: str | Kernels = "auto") -> Kernels:
    """`setting` as kernels for programs on this process's first device, where a codec's
    functions run (a `Kernels` passes through)."""
    if isinstance(setting, Kernels):
        return setting
    return select(setting, jax.local_devices()[:1])


def expected_params(cfg: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Every parameter of the model for `cfg`: flat path tuple -> shape/dtype, no memory used."""
    state = nnx.state(abstract_model(cfg, jnp.float32), nnx.Param)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def flatten_params(params: dict[Any, Any]) -> dict[tuple, Any]:
    """Nested params dict -> {path tuple: array} (empty sub-dicts vanish)."""
    return traverse_util.flatten_dict(params)


def unflatten_params(flat: dict[tuple, Any]) -> dict[Any, Any]:
    """{path tuple: array} -> nested params dict."""
    return traverse_util.unflatten_dict(flat)


def check_params(params: dict[Any, Any], cfg: ModelConfig) -> None:
    """Raises ValueError (one line) counting missing, unexpected and mis-shaped params and naming
    the first few of each."""
    expected = expected_params(cfg)
    given = flatten_params(params)
    missing = [p for p in expected if p not in given]
    unexpected = [p for p in given if p not in expected]
    misshaped = [p for p in expected if p in given and tuple(np.shape(given[p])) != tuple(expected[p].shape)]
    if not (missing or unexpected or misshaped):
        return
    name = lambda p: "/".join(map(str, p))  # noqa: E731
    problems = key_summary(
        [
            ("missing", [f"{name(p)} expected {tuple(expected[p].shape)}" for p in missing]),
            ("unexpected", [f"{name(p)} {tuple(np.shape(given[p]))}" for p in unexpected]),
            (
                "mis-shaped",
                [f"{name(p)} got {tuple(np.shape(given[p]))} instead of {tuple(expected[p].shape)}" for p in misshaped],
            ),
        ]
    )
    raise ValueError(f"params do not fit the model config: {problems}")


def params_of(model: AutoencoderKL) -> dict[Any, Any]:
    """The model's parameters as a nested dict of arrays (list indices as ints)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def build_model(
    cfg: ModelConfig,
    params: dict[Any, Any] | None = None,
    *,
    dtype="float32",
    seed: int = 0,
    kernels: str | Kernels = "auto",
):
    """An AutoencoderKL for `cfg`: randomly initialised (`seed`) or holding `params`.
    kernels: "auto" | "xla" | "gpu" | "cpu" (see `local_kernels`) or a `Kernels`."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model_kernels = local_kernels(kernels)
    if params is None:
        return AutoencoderKL(cfg, rngs=init_rngs(seed), dtype=dtype, kernels=model_kernels)
    check_params(params, cfg)
    model = abstract_model(cfg, dtype, model_kernels)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model
