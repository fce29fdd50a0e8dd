"""A ResnetBlock's residual branch, GroupNorm -> SiLU -> conv3x3 twice, with a backward pass
written out so that XLA's fusions read each activation fewer times.

Autodiff forms the input gradient of the second GroupNorm in a pass of its own (the cotangent
and the activation read, the gradient written) and then reads that gradient twice, once for
each of the first conv's gradients. The backward here writes that input gradient as
`alpha * d_y + beta * h + delta` with per-(image, channel) coefficients, spelled differently
for the two convs so that XLA keeps one copy per conv and fuses it into the conv's operand
instead of writing it out; the first conv's bias gradient comes from sums already taken. The
other passes are autodiff's. The forward pass computes what the modules compute
(`layers.GroupNorm`, `nnx.silu`, the convs' function and bias) in the same order of operations.

The rule is a custom JVP whose tangent map is the transpose of that backward pass: reverse mode
transposes it back, and forward mode (`jax.jvp`) still passes through.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32
_NHWC = ("NHWC", "HWIO", "NHWC")
PARAMETERS = (
    "norm1_scale",
    "norm1_bias",
    "conv1_kernel",
    "conv1_bias",
    "norm2_scale",
    "norm2_bias",
    "conv2_kernel",
    "conv2_bias",
)


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
    """(B, G) -> (B, 1, 1, C), each group's value on its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)[:, None, None, :]


def _group_size(x: jax.Array, groups: int) -> int:
    """How many elements of one image of NHWC `x` each GroupNorm group holds."""
    return x.shape[1] * x.shape[2] * (x.shape[-1] // groups)


def _group_statistics(x: jax.Array, groups: int, eps: float, fast_variance: bool):
    """(per-(B, C) sums of x, per-(B, G) mean, per-(B, G) 1/sqrt(var + eps)), in float32, as
    `layers.GroupNorm` computes them (one pass, E[x^2] - E[x]^2 clipped at 0, when
    `fast_variance`; else two)."""
    b, _, _, c = x.shape
    xf = x.astype(F32)
    count = _group_size(x, groups)
    sums = xf.sum((1, 2))
    mean = sums.reshape(b, groups, -1).sum(-1) / count
    if fast_variance:
        squares = (xf * xf).sum((1, 2)).reshape(b, groups, -1).sum(-1) / count
        variance = jnp.maximum(0.0, squares - mean * mean)
    else:
        centred = xf - _per_channel(mean, c)
        variance = (centred * centred).sum((1, 2)).reshape(b, groups, -1).sum(-1) / count
    return sums, mean, jax.lax.rsqrt(variance + eps)


def _normalised(x: jax.Array, mean: jax.Array, rstd: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    c = x.shape[-1]
    return ((x.astype(F32) - _per_channel(mean, c)) * (_per_channel(rstd, c) * scale) + bias).astype(x.dtype)


def _norm_silu_backward(d_activation, x, mean, rstd, scale, bias):
    """d_y, the cotangent of the GroupNorm's output (x's dtype), and its per-(B, C) sums
    sum(d_y) and sum(d_y * x_hat) in float32."""
    c = x.shape[-1]
    y = _normalised(x, mean, rstd, scale, bias).astype(F32)
    sigmoid = jax.nn.sigmoid(y)
    d_y = (d_activation.astype(F32) * sigmoid * (1 + y * (1 - sigmoid))).astype(x.dtype)
    x_hat = (x.astype(F32) - _per_channel(mean, c)) * _per_channel(rstd, c)
    d_yf = d_y.astype(F32)
    return d_y, d_yf.sum((1, 2)), (d_yf * x_hat).sum((1, 2))


def _input_gradient_coefficients(sum_d_y, sum_d_y_x_hat, mean, rstd, scale, count):
    """(alpha, beta, delta), each (B, 1, 1, C): the GroupNorm's input gradient is
    alpha * d_y + beta * x + delta."""
    b, c = sum_d_y.shape
    groups = mean.shape[1]
    mean_d = (scale * sum_d_y).reshape(b, groups, -1).sum(-1) / count
    mean_d_x_hat = (scale * sum_d_y_x_hat).reshape(b, groups, -1).sum(-1) / count
    rstd2 = rstd * rstd
    return (
        _per_channel(rstd, c) * scale,
        _per_channel(-rstd2 * mean_d_x_hat, c),
        _per_channel(rstd2 * mean_d_x_hat * mean - rstd * mean_d, c),
    )


def _input_gradient(coefficients, d_y, x, *, spelled: int = 0) -> jax.Array:
    """alpha * d_y + beta * x + delta in x's dtype; `spelled` 1 sums in another order, which XLA
    does not merge with spelling 0, so each consumer fuses its own copy."""
    alpha, beta, delta = coefficients
    terms = (alpha * d_y.astype(F32), beta * x.astype(F32), delta)
    total = terms[0] + terms[1] + terms[2] if spelled == 0 else terms[2] + terms[1] + terms[0]
    return total.astype(x.dtype)


def _same_conv3x3(conv_general_dilated: Callable, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3 conv, stride 1, padding 1, NHWC, of x with `kernel` cast to x's dtype, no bias."""
    return conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), [(1, 1), (1, 1)], dimension_numbers=_NHWC)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def resnet_branch(
    conv_general_dilated: Callable, norm: tuple[int, float, bool], x: jax.Array, params: dict[str, jax.Array]
) -> jax.Array:
    """conv2(silu(norm2(conv1(silu(norm1(x)))))), each conv 3x3 with its bias, for NHWC `x` in
    the model's compute dtype; returns that dtype, shape (B, H, W, C_out).

    conv_general_dilated: `lax.conv_general_dilated` or a function of the same signature.
    norm: (groups, eps, fast_variance) of both GroupNorms (`layers.GroupNorm`). params:
    PARAMETERS, in any float dtype; their gradients come back in their own dtypes. Forward and
    reverse mode both pass through.
    """
    return _forward(conv_general_dilated, norm, x, params)[0]


def _forward(conv_general_dilated, norm, x, params):
    conv = functools.partial(_same_conv3x3, conv_general_dilated)
    dtype = x.dtype
    p = params
    _, mean1, rstd1 = _group_statistics(x, *norm)
    a1 = jax.nn.silu(_normalised(x, mean1, rstd1, p["norm1_scale"], p["norm1_bias"]))
    h1 = conv(a1, p["conv1_kernel"]) + p["conv1_bias"].astype(dtype)
    sums_h1, mean2, rstd2 = _group_statistics(h1, *norm)
    a2 = jax.nn.silu(_normalised(h1, mean2, rstd2, p["norm2_scale"], p["norm2_bias"]))
    h2 = conv(a2, p["conv2_kernel"]) + p["conv2_bias"].astype(dtype)
    return h2, (x, h1, sums_h1, mean1, rstd1, mean2, rstd2, params)


def _backward(conv_general_dilated, norm, saved, d_h2):
    conv = functools.partial(_same_conv3x3, conv_general_dilated)
    x, h1, sums_h1, mean1, rstd1, mean2, rstd2, p = saved
    groups = norm[0]
    a2 = jax.nn.silu(_normalised(h1, mean2, rstd2, p["norm2_scale"], p["norm2_bias"]))
    d_a2, d_kernel2 = jax.vjp(conv, a2, p["conv2_kernel"])[1](d_h2)
    d_y2, sum_d_y2, sum_d_y2_x_hat = _norm_silu_backward(d_a2, h1, mean2, rstd2, p["norm2_scale"], p["norm2_bias"])
    coefficients2 = _input_gradient_coefficients(
        sum_d_y2, sum_d_y2_x_hat, mean2, rstd2, p["norm2_scale"], _group_size(h1, groups)
    )
    a1 = jax.nn.silu(_normalised(x, mean1, rstd1, p["norm1_scale"], p["norm1_bias"]))
    d_kernel1 = jax.vjp(lambda kernel: conv(a1, kernel), p["conv1_kernel"])[1](
        _input_gradient(coefficients2, d_y2, h1)
    )[0]
    d_a1 = jax.vjp(lambda a: conv(a, p["conv1_kernel"]), a1)[1](_input_gradient(coefficients2, d_y2, h1, spelled=1))[0]
    alpha, beta, delta = (c[:, 0, 0, :] for c in coefficients2)
    d_bias1 = (alpha * sum_d_y2 + beta * sums_h1 + delta * (h1.shape[1] * h1.shape[2])).sum(0)
    d_y1, sum_d_y1, sum_d_y1_x_hat = _norm_silu_backward(d_a1, x, mean1, rstd1, p["norm1_scale"], p["norm1_bias"])
    coefficients1 = _input_gradient_coefficients(
        sum_d_y1, sum_d_y1_x_hat, mean1, rstd1, p["norm1_scale"], _group_size(x, groups)
    )
    gradients = {
        "norm1_scale": sum_d_y1_x_hat.sum(0),
        "norm1_bias": sum_d_y1.sum(0),
        "conv1_kernel": d_kernel1,
        "conv1_bias": d_bias1,
        "norm2_scale": sum_d_y2_x_hat.sum(0),
        "norm2_bias": sum_d_y2.sum(0),
        "conv2_kernel": d_kernel2,
        "conv2_bias": d_h2.astype(F32).sum((0, 1, 2)),
    }
    return _input_gradient(coefficients1, d_y1, x), {k: gradients[k].astype(p[k].dtype) for k in p}


@resnet_branch.defjvp
def _jvp(conv_general_dilated, norm, primals, tangents):
    # the tangent map as the transpose of `_backward`, so that reverse mode compiles `_backward`
    out, saved = _forward(conv_general_dilated, norm, *primals)
    (tangent,) = jax.linear_transpose(functools.partial(_backward, conv_general_dilated, norm, saved), out)(tangents)
    return out, tangent


def branch_parameters(block: Any) -> dict[str, jax.Array]:
    """PARAMETERS of a `layers.ResnetBlock`, as arrays."""
    return {name: getattr(getattr(block, name.split("_")[0]), name.split("_")[1])[...] for name in PARAMETERS}
