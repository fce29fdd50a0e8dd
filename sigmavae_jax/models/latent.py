"""What happens between encoder and decoder: the posterior, latent normalisation,
Sigma-VAE noise and the scale/shift factors a downstream model uses.

All functions are pure and take NHWC latents.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class Posterior(NamedTuple):
    """A diagonal Gaussian over the latent; `deterministic` means a point mass at `mean`.

    mean, logvar: (B, h, w, z). logvar is already clipped to [-30, 20].
    """

    mean: jax.Array
    logvar: jax.Array
    deterministic: bool

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        if self.deterministic:
            return self.mean
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * eps

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per sample, shape (B,); zero for a deterministic posterior."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        mean = self.mean.astype(jnp.float32)
        logvar = self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, h, w, 2z) encoder output -> mean, logvar (clipped), each (B, h, w, z)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def patch_layer_norm(mean: jax.Array, patch: int, eps: float) -> jax.Array:
    """NextStep-1 latent normalisation: LayerNorm (no affine) over each p x p patch.

    The p*p*z values of a patch are normalised together; the channel order inside a patch
    (c * p * p + i * p + j in torch) does not change mean or variance, so the patch is
    normalised in place without materialising the torch layout.
    """
    b, h, w, z = mean.shape
    if h % patch or w % patch:
        raise ValueError(
            f"latent of spatial size {h}x{w} cannot be split into {patch}x{patch} patches; "
            f"image sides must be multiples of {patch} times the downsampling factor"
        )
    x = mean.astype(jnp.float32).reshape(b, h // patch, patch, w // patch, patch, z)  # (B, h/p, p, w/p, p, z)
    axes = (2, 4, 5)
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=axes, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(var + eps)
    return x.reshape(b, h, w, z).astype(mean.dtype)


def draw_sigma(key: jax.Array, batch: int, distribution: str, strength: float) -> jax.Array:
    """One sigma per sample, shape (B, 1, 1, 1): U(0, strength) or N(0, strength^2)."""
    shape = (batch, 1, 1, 1)
    if distribution == "uniform":
        return jax.random.uniform(key, shape, jnp.float32, 0.0, strength)
    if distribution == "normal":
        return strength * jax.random.normal(key, shape, jnp.float32)
    if distribution == "none":
        return jnp.zeros(shape, jnp.float32)
    raise ValueError(f"sigma distribution {distribution!r} unknown; use 'uniform', 'normal' or 'none'")


def add_sigma_noise(z: jax.Array, key: jax.Array, distribution: str, strength: float) -> jax.Array:
    """Sigma-VAE: z + sigma * eps with eps ~ N(0, I) and sigma drawn once per sample."""
    if distribution == "none" or strength == 0.0:
        return z
    sigma_key, eps_key = jax.random.split(key)
    sigma = draw_sigma(sigma_key, z.shape[0], distribution, strength)
    eps = jax.random.normal(eps_key, z.shape, jnp.float32)
    return (z.astype(jnp.float32) + sigma * eps).astype(z.dtype)


def scale_latent(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """The latent a diffusion model sees: (z - shift) * scale."""
    return (z - shift_factor) * scaling_factor


def unscale_latent(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """Inverse of `scale_latent`: z / scale + shift."""
    return z / scaling_factor + shift_factor
