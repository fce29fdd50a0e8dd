"""The building blocks of the LDM AutoencoderKL, NHWC, in Flax NNX.

Attribute names follow the LDM/CompVis checkpoint layout (`norm1`, `conv1`, `nin_shortcut`,
`q`, `k`, `v`, `proj_out`, ...) so that a parameter path here reads like the torch key.
Parameters are float32; `dtype` is the compute dtype. GroupNorm always computes in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


@dataclasses.dataclass
class SharedGroupStats:
    """Lets tiles of one image normalise with the image's GroupNorm statistics.

    While active (see `shared_group_stats`), every GroupNorm call, in call order, normalises
    with `stats[i]` (mean, var), each (B, groups), when given, else with its own statistics,
    and records its input's statistics weighted by `weight` (the tile's blend weights at the
    largest resolution, average-pooled to the layer's): (weight sum, mean, sum of weighted
    squared deviations), each (B, groups), so tiles combine exactly (Chan et al.).
    """

    weight: jax.Array | None  # (H, W) at the largest resolution the model sees; None: no records
    stats: list[tuple[jax.Array, jax.Array]] | None = None
    records: list[tuple[jax.Array, jax.Array, jax.Array]] = dataclasses.field(default_factory=list)
    calls: int = 0

    def normalize(self, norm: "GroupNorm", x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = norm.num_groups
        xg = x.reshape(b, h, w, groups, c // groups)
        index = self.calls
        self.calls += 1
        if self.weight is not None:
            pool = self.weight.shape[0] // h
            weight = self.weight.reshape(h, pool, w, pool).mean((1, 3))[None, :, :, None, None]
            weight_sum = weight.sum() * (c // groups)
            tile_mean = (xg * weight).sum((1, 2, 4)) / weight_sum
            deviation = ((xg - tile_mean[:, None, None, :, None]) ** 2 * weight).sum((1, 2, 4))
            self.records.append((jnp.broadcast_to(weight_sum, tile_mean.shape), tile_mean, deviation))
        if self.stats is None:
            mean = xg.mean((1, 2, 4))
            var = ((xg - mean[:, None, None, :, None]) ** 2).mean((1, 2, 4))
        else:
            mean, var = self.stats[index]
        y = (xg - mean[:, None, None, :, None]) * jax.lax.rsqrt(var + norm.epsilon)[:, None, None, :, None]
        return y.reshape(b, h, w, c) * norm.scale[...] + norm.bias[...]


_shared_stats: contextvars.ContextVar[SharedGroupStats | None] = contextvars.ContextVar("shared_group_stats", default=None)


@contextlib.contextmanager
def shared_group_stats(hook: SharedGroupStats):
    """Within this block (while tracing), GroupNorms normalise and record through `hook`."""
    token = _shared_stats.set(hook)
    try:
        yield hook
    finally:
        _shared_stats.reset(token)


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
        hook = _shared_stats.get()
        if hook is not None:
            return hook.normalize(self, x.astype(jnp.float32)).astype(x.dtype)
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


_NHWC = ("NHWC", "HWIO", "NHWC")

# XLA's CPU kernel gradient of a 3x3 conv is a conv whose window is the whole image and
# whose contraction depth is the batch; it slows down as the image grows (128x128, batch 2:
# ~90 GFLOP/s whole, ~125 in pieces of 8192 pixels; `bench/op_profile.py --layers`). Pieces are unrolled,
# so their number is capped to bound the program size.
KERNEL_GRAD_PIXELS = 8192
KERNEL_GRAD_MAX_PIECES = 16


def _same_conv(x: jax.Array, kernel: jax.Array, row_padding=(1, 1)) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), (row_padding, (1, 1)), dimension_numbers=_NHWC)


def kernel_grad_pieces(batch: int, height: int, width: int) -> tuple[int, int]:
    """(images, rows) per piece of a 3x3 kernel gradient on CPU: whole batches of fewer rows,
    at least 8, about KERNEL_GRAD_PIXELS pixels a piece, at most KERNEL_GRAD_MAX_PIECES pieces."""
    pixels = max(KERNEL_GRAD_PIXELS, -(-batch * height * width // KERNEL_GRAD_MAX_PIECES))
    rows = pixels // (batch * width)
    if rows >= 8:
        return batch, min(rows, height)
    return max(1, pixels // (8 * width)), 8


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3 conv, stride 1, padding 1 (NHWC, HWIO). On CPU its kernel gradient is summed
    over pieces of the batch and rows (`kernel_grad_pieces`); elsewhere it is XLA's own."""
    return _same_conv(x, kernel)


def _conv3x3_forward(x, kernel):
    return _same_conv(x, kernel), (x, kernel)


def _conv3x3_backward(saved, cotangent):
    x, kernel = saved
    dx = jax.vjp(lambda x: _same_conv(x, kernel), x)[1](cotangent)[0]
    b, h, w, _ = x.shape
    images, rows = kernel_grad_pieces(b, h, w) if jax.default_backend() == "cpu" else (b, h)
    x_rows = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))  # each piece takes its halo rows from here
    dkernel = jnp.zeros(kernel.shape, jnp.float32)
    for i in range(0, b, images):
        for r in range(0, h, rows):
            piece = x_rows[i : i + images, r : r + min(rows, h - r) + 2]
            grad = jax.vjp(lambda k: _same_conv(piece, k, (0, 0)), kernel)[1](cotangent[i : i + images, r : r + rows])[0]
            dkernel = dkernel + grad.astype(jnp.float32)
    return dx, dkernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


class Conv(nnx.Conv):
    """nnx.Conv (same parameters) computing 3x3 stride-1 'same' convs with `conv3x3` and 1x1
    convs as a matrix product, which XLA's CPU backend runs 2-3x faster than a 1x1 conv."""

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """This conv of `x` with `kernel` in place of its own, without the bias or casts: the
        form the model computes, for gradients with respect to the kernel too."""
        size, stride = tuple(self.kernel_size), self.strides
        if size == (1, 1) and stride in (1, (1, 1)) and self.padding == [(0, 0), (0, 0)]:
            return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        if size == (3, 3) and stride in (1, (1, 1)) and self.padding == [(1, 1), (1, 1)]:
            return conv3x3(x, kernel)
        strides = (stride,) * 2 if isinstance(stride, int) else tuple(stride)
        return jax.lax.conv_general_dilated(x, kernel, strides, self.padding, dimension_numbers=_NHWC)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = self.apply_kernel(x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype) if self.bias is not None else y


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    stride: int = 1,
    padding=None,
) -> Conv:
    """A conv with torch's symmetric `kernel // 2` padding unless `padding` is given."""
    if padding is None:
        padding = [(kernel // 2, kernel // 2)] * 2
    return Conv(
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

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(
            channels, channels, 3, stride=2, padding=[(0, 1), (0, 1)], dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def _fold_taps(kernel: jax.Array, axis: int) -> jax.Array:
    """Along one axis, nearest x2 followed by a 3-tap filter (padding 1) is, for even outputs
    2i, the taps (k0, k1 + k2) on inputs (i - 1, i) and, for odd outputs 2i + 1, (k0 + k1, k2)
    on (i, i + 1). Returns (output phase, folded tap, ...) with `axis` (3 taps) removed."""
    k0, k1, k2 = (jnp.take(kernel, tap, axis=axis) for tap in range(3))
    return jnp.stack([jnp.stack([k0, k1 + k2]), jnp.stack([k0 + k1, k2])])


def _phase_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C_in, C_out) -> the (2, 2, C_in, 4 * C_out) kernel of the four output phases.
    Sums of taps, not an einsum with a 0/1 matrix: XLA ran that as thin matrix products plus
    layout copies, ~0.1 s of each SD training step."""
    rows = _fold_taps(kernel, 0)  # (a, p, j, C_in, C_out): a the row phase, p the row tap
    both = _fold_taps(rows, 2)  # (b, q, a, p, C_in, C_out)
    phases = both.transpose(3, 1, 4, 2, 0, 5)  # (p, q, C_in, a, b, C_out)
    return phases.reshape(2, 2, kernel.shape[2], 4 * kernel.shape[3])


@jax.custom_vjp
def upsampled_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Nearest x2, then a 3x3 conv (padding 1), without the x2 image: each of the four output phases is a
    2x2 conv of the input with taps folded from the 3x3 kernel, all four as one conv with 4x
    the output channels: 16 instead of 36 multiply-adds per input pixel and channel pair.
    The gradients (`_upsampled_conv_backward`) are taken the same way."""
    b, h, w, _ = x.shape
    c_out = kernel.shape[-1]
    y = jax.lax.conv_general_dilated(x, _phase_kernel(kernel), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    # (B, H + 1, W + 1, 4 * C_out): phase (a, b) of output pixel (i, j) sits at (i + a, j + b)
    y = y.reshape(b, h + 1, w + 1, 2, 2, c_out)
    rows = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c_out)  # (B, H, 2, W, 2, C) -> (B, 2H, 2W, C)


def _upsampled_conv_forward(x, kernel):
    return upsampled_conv(x, kernel), (x, kernel)


def _upsampled_conv_backward(saved, cotangent):
    """Written by hand because XLA's CPU gradient of the 2x2, 4x-wide conv runs 30x slower
    than its forward. With z the cotangent laid out like the forward's (H + 1, W + 1, 4 C)
    output: the input gradient is a forward conv of z with the flipped, transposed phase
    kernel; the kernel gradient is four matrix products (one per 2x2 tap) of the shifted
    input with z, folded back to 3x3 through the phase map's own transpose."""
    x, kernel = saved
    b, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    phases, fold_back = jax.vjp(_phase_kernel, kernel)
    dy = cotangent.reshape(b, h, 2, w, 2, c_out)
    z = jnp.stack(
        [jnp.stack([jnp.pad(dy[:, :, a, :, c], ((0, 0), (a, 1 - a), (c, 1 - c), (0, 0))) for c in (0, 1)], axis=3)
         for a in (0, 1)],
        axis=3,
    ).reshape(b, h + 1, w + 1, 4 * c_out)
    flipped = jnp.flip(phases, (0, 1)).transpose(0, 1, 3, 2)  # (2, 2, 4 C_out, C_in)
    dx = jax.lax.conv_general_dilated(z, flipped, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d_phases = jnp.stack([
        jnp.stack([jnp.einsum("bhwc,bhwo->co", x_pad[:, p : p + h + 1, q : q + w + 1], z) for q in (0, 1)])
        for p in (0, 1)
    ])
    return dx[:, 1 : h + 1, 1 : w + 1].astype(x.dtype), fold_back(d_phases.astype(phases.dtype))[0]


upsampled_conv.defvjp(_upsampled_conv_forward, _upsampled_conv_backward)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3 (parameters as in the checkpoints; computed by
    `upsampled_conv`)."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.conv.dtype
        out = upsampled_conv(x.astype(dtype), self.conv.kernel[...].astype(dtype))
        return out + self.conv.bias[...].astype(out.dtype)
