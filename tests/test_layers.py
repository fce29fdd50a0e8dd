"""Layer formulations that differ from the written maths only in how they compute it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _same_conv_reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("pixels", [10**9, 3 * 11 * 9, 8 * 9])  # one piece; batch of 11-row pieces (ragged); single images
def test_conv3x3_gradients_summed_over_pieces_equal_the_whole_conv(monkeypatch, pixels):
    monkeypatch.setattr(layers, "KERNEL_GRAD_PIXELS", pixels)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 20, 9, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(3, 20, 9, 4)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        ours = jax.vjp(layers.conv3x3, x, kernel)
        reference = jax.vjp(_same_conv_reference, x, kernel)
        np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(reference[0]), atol=1e-5)
        for got, want in zip(ours[1](cotangent), reference[1](cotangent)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_kernel_grad_pieces_cover_the_batch_and_bound_the_piece_count():
    for batch, height, width in [(2, 128, 128), (1, 256, 256), (8, 256, 256), (2, 16, 16), (4, 4096, 4096)]:
        images, rows = layers.kernel_grad_pieces(batch, height, width)
        assert 1 <= images <= batch and 1 <= rows <= height
        pieces = -(-batch // images) * -(-height // rows)
        assert pieces <= layers.KERNEL_GRAD_MAX_PIECES or rows == 8, (batch, height, width, images, rows)
    assert layers.kernel_grad_pieces(2, 16, 16) == (2, 16)  # small tensors stay whole
    assert layers.kernel_grad_pieces(2, 128, 128) == (2, 32)


def test_conv_module_matches_flax_conv_for_1x1_3x3_and_strided_kernels():
    from flax import nnx

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.float32)
    # (kernel, stride, padding, the primitive our module must lower to)
    for size, stride, padding, route in [(1, 1, [(0, 0), (0, 0)], "dot_general"), (3, 1, [(1, 1), (1, 1)], "conv3x3"),
                                         (3, 2, [(0, 1), (0, 1)], "conv_general_dilated")]:
        ours = layers.conv(6, 4, size, stride=stride, padding=padding, dtype=jnp.float32, rngs=nnx.Rngs(0))
        flax_conv = nnx.Conv(6, 4, (size, size), strides=stride, padding=padding, rngs=nnx.Rngs(0))
        assert route in str(jax.make_jaxpr(ours)(x))
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(flax_conv(x)), rtol=1e-5, atol=1e-5)
