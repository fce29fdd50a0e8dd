"""Random streams for building models, quick to trace.

Models are built under a trace more often than not: `nnx.eval_shape` for abstract models and
shardings, `jax.jit` for a train state born sharded. With flax 0.12's `nnx.Rngs`, each draw
adds one to the stream's traced count, and `Variable.set_value` then asks that traced count for
its `.sharding`; jax answers with an AttributeError whose message walks the whole trace so far
to say where the tracer came from. One draw per parameter makes building a model quadratic in
its size (measured in docs/performance.md and `bench/model_build.py`).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def init_rngs(seed: int | jax.Array) -> nnx.Rngs:
    """`nnx.Rngs(seed)` whose stream counts its draws in numpy instead of in the trace.

    Guarantees: the same keys as `nnx.Rngs(seed)` (draw n is `fold_in(key, n)`), so a model
    built from it holds bitwise the same parameters, eagerly and under `jit`; `seed` is an int
    or a (possibly traced) key. Meant for a model's construction only: its count is host state,
    so splitting or carrying these Rngs through a transform is not supported.
    """
    rngs = nnx.Rngs(seed)
    count = rngs.default.count
    count.set_value(np.zeros(np.shape(count.get_value()), np.uint32))
    # `count[...] += 1` adds in place to what `count[...]` returns: hand out a copy, so a key
    # drawn earlier (which may hold the array itself as a trace constant) keeps its count.
    count.set_metadata(on_get_value=lambda _, value: np.array(value))
    return rngs
