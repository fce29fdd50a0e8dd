"""The reference `GeneralLPIPSWithDiscriminator` losses, as pure functions.

Images are NHWC float32 in [-1, 1]. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


def pixel_loss(x: jax.Array, x_hat: jax.Array, kind: str) -> jax.Array:
    """Per-element reconstruction error, shape of x: |x - x_hat| (l1) or (x - x_hat)^2 (l2)."""
    diff = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
    if kind == "l1":
        return jnp.abs(diff)
    if kind == "l2":
        return jnp.square(diff)
    raise ValueError(f"pixel loss {kind!r} unknown; use 'l1' or 'l2'")


def reconstruction_loss(pixel: jax.Array, perceptual: jax.Array | None, perceptual_weight: float) -> jax.Array:
    """pixel (B, H, W, C) + perceptual_weight * LPIPS (B,) broadcast over the pixels."""
    if perceptual is None or perceptual_weight == 0.0:
        return pixel
    return pixel + perceptual_weight * perceptual.astype(jnp.float32)[:, None, None, None]


def nll_loss(rec: jax.Array, logvar: jax.Array) -> jax.Array:
    """sum(rec / exp(logvar) + logvar) / batch, logvar a scalar."""
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec.shape[0]


def kl_loss(kl_per_sample: jax.Array) -> jax.Array:
    """Mean over the batch of the per-sample KL (summed over latent elements)."""
    return jnp.sum(kl_per_sample) / kl_per_sample.shape[0]


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """g = -mean(D(x_hat))."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str) -> jax.Array:
    """hinge: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)));
    vanilla: 0.5 (mean softplus(-D(x)) + mean softplus(D(x_hat)))."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    if kind == "vanilla":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))
    raise ValueError(f"discriminator loss {kind!r} unknown; use 'hinge' or 'vanilla'")


def adaptive_weight(nll_grad: jax.Array, gan_grad: jax.Array, disc_weight: float) -> jax.Array:
    """clip(|grad_W nll| / (|grad_W g| + 1e-4), 0, 1e4) * disc_weight, no gradient through it.

    nll_grad, gan_grad: gradients of the two losses w.r.t. the decoder's conv_out kernel.
    """
    ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (
        jnp.linalg.norm(gan_grad.astype(jnp.float32)) + ADAPTIVE_EPS
    )
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX) * disc_weight)


def adopt_weight(weight: float, step: jax.Array, start: int) -> jax.Array:
    """`weight` from step `start` on, 0 before (taming's adopt_weight)."""
    return jnp.where(step >= start, weight, 0.0).astype(jnp.float32)
