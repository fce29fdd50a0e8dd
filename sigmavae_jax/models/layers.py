"""The building blocks of the LDM AutoencoderKL, NHWC, in Flax NNX.

Attribute names follow the LDM/CompVis checkpoint layout (`norm1`, `conv1`, `nin_shortcut`,
`q`, `k`, `v`, `proj_out`, ...) so that a parameter path here reads like the torch key.
Parameters are float32; `dtype` is the compute dtype. GroupNorm always computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sigmavae_jax.kernels import Kernels
from sigmavae_jax.models.resnet_branch import branch_parameters, resnet_branch

Dtype = jnp.dtype | type


class GroupNorm(nnx.GroupNorm):
    """GroupNorm(eps 1e-6) that normalises in float32 and returns the input's dtype.

    `model_dtype` is the compute dtype of the model around it. For float32 models the variance
    takes two passes over x, as torch computes it. For bfloat16 models it takes one pass,
    E[x^2] - E[x]^2 in float32: both sums then fuse into the op that produced x, saving a read
    of every normalised activation.
    """

    def __init__(self, num_features: int, *, num_groups: int, rngs: nnx.Rngs, model_dtype: Dtype = jnp.float32):
        super().__init__(
            num_features,
            num_groups=num_groups,
            epsilon=1e-6,
            dtype=jnp.float32,
            use_fast_variance=jnp.dtype(model_dtype) == jnp.dtype(jnp.bfloat16),
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
    kernels: Kernels,
    stride: int = 1,
    padding=None,
) -> nnx.Conv:
    """An NHWC conv with torch's symmetric `kernel // 2` padding unless `padding` is given,
    computed by `kernels.conv_general_dilated`."""
    if padding is None:
        padding = [(kernel // 2, kernel // 2)] * 2
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        dtype=dtype,
        conv_general_dilated=kernels.conv_general_dilated,
        rngs=rngs,
    )


def conv_with_kernel(conv: nnx.Conv, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv` of NHWC `x` with `kernel` in place of its own, computed by the conv's own
    function, without its bias or dtype casts (for gradients with respect to the kernel)."""
    strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)
    return conv.conv_general_dilated(x, kernel, strides, conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ResnetBlock(nnx.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus the residual.

    With `kernels.written_block_backward` the branch is `resnet_branch` (the same forward pass,
    a backward pass written out); otherwise autodiff differentiates the modules.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, dtype: Dtype, kernels: Kernels, rngs: nnx.Rngs
    ):
        self.norm1 = GroupNorm(in_channels, num_groups=groups, model_dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, kernels=kernels, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, num_groups=groups, model_dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, kernels=kernels, rngs=rngs)
        self.nin_shortcut = (
            conv(in_channels, out_channels, 1, dtype=dtype, kernels=kernels, rngs=rngs)
            if in_channels != out_channels
            else None
        )
        self.written_backward = kernels.written_block_backward

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.written_backward:
            norm = (self.norm1.num_groups, self.norm1.epsilon, self.norm1.use_fast_variance)
            h = resnet_branch(
                self.conv1.conv_general_dilated, norm, x.astype(self.conv1.dtype), branch_parameters(self)
            )
        else:
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
        self.norm = GroupNorm(channels, num_groups=groups, model_dtype=dtype, rngs=rngs)
        self.q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.proj_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, 1, c)  # (B, H*W, heads=1, C)
        out = attention(self.q(tokens), self.k(tokens), self.v(tokens))
        return x + self.proj_out(out.reshape(b, h, w, c))


QUERY_BLOCK = 1024


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention, (B, N, heads, C). Past 4 query blocks of tokens (a 512 x 512 image at
    f8) the queries go through in blocks, so memory grows as N * QUERY_BLOCK instead of N^2:
    a 2048 x 2048 image at f8 has 65536 tokens, whose full logits would take 16 GiB."""
    b, n, heads, c = q.shape
    if n <= 4 * QUERY_BLOCK:
        return jax.nn.dot_product_attention(q, k, v)
    blocks = -(-n // QUERY_BLOCK)
    q = jnp.pad(q, ((0, 0), (0, blocks * QUERY_BLOCK - n), (0, 0), (0, 0)))
    q = q.reshape(b, blocks, QUERY_BLOCK, heads, c).swapaxes(0, 1)
    out = jax.lax.map(lambda block: jax.nn.dot_product_attention(block, k, v), q)
    return out.swapaxes(0, 1).reshape(b, blocks * QUERY_BLOCK, heads, c)[:, :n]


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then conv3x3 stride 2 (LDM's asymmetric padding)."""

    def __init__(self, channels: int, *, dtype: Dtype, kernels: Kernels, rngs: nnx.Rngs):
        self.conv = conv(
            channels, channels, 3, stride=2, padding=[(0, 1), (0, 1)], dtype=dtype, kernels=kernels, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3: (B, H, W, C) -> (B, 2H, 2W, C). The parameters are
    the checkpoints' conv; `kernels.upsampled_conv` computes it without the x2 image."""

    def __init__(self, channels: int, *, dtype: Dtype, kernels: Kernels, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, kernels=kernels, rngs=rngs)
        self.upsampled_conv = kernels.upsampled_conv

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.conv.dtype
        out = self.upsampled_conv(x.astype(dtype), self.conv.kernel[...].astype(dtype))
        return out + self.conv.bias[...].astype(out.dtype)
