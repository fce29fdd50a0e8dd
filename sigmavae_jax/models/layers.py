"""The building blocks of the LDM AutoencoderKL, NHWC, in Flax NNX.

Attribute names follow the LDM/CompVis checkpoint layout (`norm1`, `conv1`, `nin_shortcut`,
`q`, `k`, `v`, `proj_out`, ...) so that a parameter path here reads like the torch key.
Parameters are float32; `dtype` is the compute dtype. GroupNorm always computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


class GroupNorm(nnx.GroupNorm):
    """GroupNorm(eps 1e-6) that normalises in float32 and returns the input's dtype."""

    def __init__(self, num_features: int, *, num_groups: int, rngs: nnx.Rngs):
        super().__init__(
            num_features,
            num_groups=num_groups,
            epsilon=1e-6,
            dtype=jnp.float32,
            use_fast_variance=False,  # two-pass variance, as torch computes it
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    stride: int = 1,
    padding=None,
) -> nnx.Conv:
    """A conv with torch's symmetric `kernel // 2` padding unless `padding` is given."""
    if padding is None:
        padding = [(kernel // 2, kernel // 2)] * 2
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        dtype=dtype,
        rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus the residual."""

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs
    ):
        self.norm1 = GroupNorm(in_channels, num_groups=groups, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, num_groups=groups, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.nin_shortcut = (
            conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, scale C^-1/2, plus the residual.

    q, k, v and proj_out are 1x1 convs in LDM files and Linear layers in diffusers files;
    both are the same matrix, kept here as Linear kernels of shape (C_in, C_out).
    """

    def __init__(self, channels: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, num_groups=groups, rngs=rngs)
        self.q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.proj_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, 1, c)  # (B, H*W, heads=1, C)
        out = jax.nn.dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then conv3x3 stride 2 (LDM's asymmetric padding)."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(
            channels, channels, 3, stride=2, padding=[(0, 1), (0, 1)], dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))  # (B, H, 2, W, 2, C)
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))
