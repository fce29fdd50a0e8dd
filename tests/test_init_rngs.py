"""`models.init_rngs`: the keys of `nnx.Rngs`, drawn without walking the trace per draw."""

from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval

from sigmavae_jax.config import load_config
from sigmavae_jax.models.autoencoder import AutoencoderKL
from sigmavae_jax.models.discriminator import NLayerDiscriminator
from sigmavae_jax.models.init_rngs import init_rngs


def key_data(keys):
    return [np.asarray(jax.random.key_data(key)) for key in keys]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
def test_draws_are_the_keys_of_nnx_rngs(traced):
    def draws(make, key):
        rngs = make(key)
        return [rngs.params() for _ in range(3)] + [rngs.dropout(), rngs()]

    key = jax.random.key(7)
    if traced:
        ours, theirs = jax.jit(lambda k: draws(init_rngs, k))(key), jax.jit(lambda k: draws(nnx.Rngs, k))(key)
    else:
        ours, theirs = draws(init_rngs, key), draws(nnx.Rngs, key)
    want = [jax.random.fold_in(key, n) for n in range(5)]
    assert np.array_equal(key_data(ours), key_data(want))
    assert np.array_equal(key_data(theirs), key_data(want))


def test_models_built_under_jit_hold_the_parameters_of_nnx_rngs():
    cfg = load_config("tiny")

    def params(make, key):
        vae_key, disc_key = jax.random.split(key)
        vae = AutoencoderKL(cfg.model, rngs=make(vae_key))
        disc = NLayerDiscriminator(cfg.discriminator, in_channels=3, rngs=make(disc_key))
        return nnx.to_pure_dict(nnx.state(vae, nnx.Param)), nnx.to_pure_dict(nnx.state(disc, nnx.Param))

    key = jax.random.key(3)
    ours = jax.jit(lambda k: params(init_rngs, k))(key)
    theirs = jax.jit(lambda k: params(nnx.Rngs, k))(key)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(got, want)
    assert len({float(np.asarray(leaf).std()) for leaf in jax.tree.leaves(ours)}) > 10  # not all one draw


def test_building_under_a_trace_never_asks_a_tracer_for_its_origin():
    # The message of a tracer's missing `.sharding` walks the whole trace; flax 0.12's
    # `nnx.Rngs` builds it once per draw. If the second half fails, flax no longer does, and
    # `init_rngs` can go.
    cfg = load_config("tiny").model
    asked = AssertionError("a tracer was asked for its origin")
    with mock.patch.object(partial_eval.DynamicJaxprTracer, "_origin_msg", side_effect=asked):
        nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=init_rngs(0)))
        with pytest.raises(AssertionError, match="asked for its origin"):
            nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
