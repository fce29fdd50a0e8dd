"""Image-quality metrics with scikit-image semantics (computed in JAX) and the Frechet
distance with mergeable feature statistics (float64, on the host).

Images are NHWC floats in [0, 1]; each metric returns one value per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def _window(kind: str) -> tuple[jax.Array, int]:
    """The SSIM filter (normalised 2-D kernel) and its width: skimage's 7x7 uniform window,
    or its Gaussian (sigma 1.5, truncated at 3.5 sigma: 11x11)."""
    if kind == "uniform":
        return jnp.full((7, 7), 1.0 / 49.0, jnp.float32), 7
    if kind == "gaussian":
        radius = int(3.5 * 1.5 + 0.5)
        taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1, dtype=jnp.float32) / 1.5) ** 2)
        taps = taps / taps.sum()
        return jnp.outer(taps, taps), 2 * radius + 1
    raise ValueError(f"SSIM window {kind!r} unknown; use 'uniform' (skimage's default) or 'gaussian'")


def ssim(a: jax.Array, b: jax.Array, *, window: str = "uniform", sample_covariance: bool = True) -> jax.Array:
    """Structural similarity per image with skimage `structural_similarity(channel_axis=-1,
    data_range=1)` semantics: both clipped to [0, 1], K1 0.01, K2 0.03, local statistics over
    the window (sample covariance by default, as skimage), the SSIM map averaged over the
    positions whose window lies inside the image and over channels.
    a, b: (B, H, W, C) with H, W >= the window width -> (B,)."""
    kernel, width = _window(window)
    if min(a.shape[1], a.shape[2]) < width:
        raise ValueError(f"SSIM needs images of at least {width}x{width}; got {a.shape[1]}x{a.shape[2]}")
    a = jnp.clip(a.astype(jnp.float32), 0.0, 1.0)
    b = jnp.clip(b.astype(jnp.float32), 0.0, 1.0)
    channels = a.shape[-1]
    depthwise = jnp.tile(kernel[:, :, None, None], (1, 1, 1, channels))  # (k, k, 1, C)

    def local_mean(x):  # only fully-inside windows: skimage crops the border away
        return jax.lax.conv_general_dilated(
            x,
            depthwise,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )

    n = width * width
    norm = n / (n - 1.0) if sample_covariance else 1.0
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = norm * (local_mean(a * a) - mu_a * mu_a)
    var_b = norm * (local_mean(b * b) - mu_b * mu_b)
    cov = norm * (local_mean(a * b) - mu_a * mu_b)
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians, float64.

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which stays real and
    stable when the covariances are near-singular (fewer samples than dimensions)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStats:
    """Running sums (count, sum, sum of outer products) in float64 that merge exactly, so
    features from any split into batches, devices and processes give the same mean/covariance."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> "FeatureStats":
        """features: (N, dim)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.total.size:
            raise ValueError(f"features must be (N, {self.total.size}); got {x.shape}")
        return self.add(x.shape[0], x.sum(axis=0), x.T @ x)

    def add(self, count: int, total, outer) -> "FeatureStats":
        """Adds sums computed elsewhere (e.g. on device over one batch): N, sum (dim,),
        sum of outer products (dim, dim)."""
        self.count += int(count)
        self.total += np.asarray(total, np.float64)
        self.outer += np.asarray(outer, np.float64)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        return self.add(other.count, other.total, other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (dim,) and unbiased covariance (dim, dim), as numpy's np.cov(rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples; have {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def quantize_uint8(x01: jax.Array, rounding: str) -> jax.Array:
    """Images in [0, 1] -> the values of their uint8 version, back in [0, 1].

    "truncate" (the reference protocol: uint8(x * 255)) or "round". The 1e-3 slack keeps
    images that were uint8 to begin with exact through the float round trip."""
    scaled = jnp.clip(x01.astype(jnp.float32), 0.0, 1.0) * 255.0
    if rounding == "truncate":
        levels = jnp.floor(scaled + 1e-3)
    elif rounding == "round":
        levels = jnp.round(scaled)
    else:
        raise ValueError(f"rounding {rounding!r} unknown; use 'truncate' or 'round'")
    return jnp.clip(levels, 0.0, 255.0) / 255.0
