"""Layer formulations that differ from the written maths only in how they compute it."""

import jax
import jax.numpy as jnp
import numpy as np

from sigmavae_jax.models import layers


def test_upsampled_conv_equals_nearest_upsample_then_conv_with_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)  # odd sizes: every border phase
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 10, 14, 4)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        # the written form, independently: repeat rows and columns, then a padded 3x3 conv
        upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        reference = jax.lax.conv_general_dilated(upsampled, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(np.asarray(layers.upsampled_conv(x, kernel)), np.asarray(reference), atol=1e-5)
        ours = jax.vjp(layers.upsampled_conv, x, kernel)[1](cotangent)
        written = jax.vjp(
            lambda x, k: jax.lax.conv_general_dilated(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), k, (1, 1), "SAME",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC")), x, kernel)[1](cotangent)
    for got, want in zip(ours, written):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
