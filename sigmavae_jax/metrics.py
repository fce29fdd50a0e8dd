"""Image-quality metrics with scikit-image semantics, computed in JAX.

Images are NHWC floats in [0, 1]; each metric returns one value per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_unit_range(x: jax.Array) -> jax.Array:
    """[-1, 1] model space -> [0, 1] image space (no clipping)."""
    return (x + 1.0) / 2.0


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio per image, dB: both clipped to [0, 1], data_range 1
    (skimage `peak_signal_noise_ratio` on each image). a, b: (B, H, W, C) -> (B,)."""
    a = jnp.clip(a.astype(jnp.float32), 0.0, 1.0)
    b = jnp.clip(b.astype(jnp.float32), 0.0, 1.0)
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / mse)
