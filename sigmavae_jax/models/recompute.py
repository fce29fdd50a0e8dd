"""Recomputation in the backward pass (activation checkpointing) for NNX modules."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def recomputed(fn: Callable[..., jax.Array], modules: Any, *args: jax.Array, policy: Callable | None = None):
    """fn(modules, *args), whose backward pass keeps `args` (and what the `jax.checkpoint`
    `policy` saves; None: nothing else) and recomputes the rest.

    The modules' variables enter `jax.checkpoint` as arrays (`nnx.split`), so this works for
    modules built outside the transform being differentiated, where `nnx.remat`, which writes
    the variables back, raises a TraceContextError. fn must therefore leave the modules' state
    as it found it (no RNG streams or batch statistics): a change it makes is not kept.
    """
    graph, state = nnx.split(modules)
    return jax.checkpoint(lambda state, *args: fn(nnx.merge(graph, state), *args), policy=policy)(state, *args)
