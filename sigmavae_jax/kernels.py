"""How the model's convolutions and the train step's branches are computed, per compile target.

Three sets of kernels compute the same maths:

- `XLA`, for TPUs: plain `lax` operations; everything differentiates in forward and reverse
  mode. The nearest-x2 conv's JVP is written by hand, so that its kernel gradient does not need
  a reversed copy of the cotangent, and so is each ResnetBlock's residual branch
  (`models.resnet_branch`), so that its backward pass reads fewer activations: XLA:TPU fuses
  each conv's copy of the GroupNorm input gradient into the conv.
- `GPU`: `XLA` with autodiff's ResnetBlock backward. XLA:GPU hands convolutions to cuDNN, which
  takes no fused operand, so the written backward's two copies of each GroupNorm input gradient
  would be two arrays written and read.
- `CPU`: forms that XLA's CPU backend runs faster. 1x1 convs are matrix products. The kernel
  gradients of 3x3 convs are summed over pieces of the batch and rows. The nearest-x2 conv
  has a hand-written gradient. Both branches of a condition run and one result is selected,
  because XLA's CPU backend compiles a convolution inside a conditional branch with its
  generic loop emitter. These forms use `custom_vjp`, so `jax.jvp` does not pass through them.

`select(setting, devices)` picks a set from the devices a program is compiled for, never from
the host's default backend, so a CPU host compiling for a TPU slice gets the TPU program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

GPU_PLATFORMS = frozenset({"gpu", "cuda", "rocm"})  # jax's device.platform of a GPU

_NHWC = ("NHWC", "HWIO", "NHWC")

# The CPU kernel gradient of a 3x3 conv is summed over pieces of about this many pixels
# (whole images of fewer rows), at most this many pieces: pieces are unrolled, so their
# number is capped to bound the program size.
KERNEL_GRAD_PIXELS = 8192
KERNEL_GRAD_MAX_PIECES = 16


# Every operation a CPU kernel adds runs under this name scope, so a compiled program shows
# (in its ops' metadata) whether it holds any CPU kernel.
CPU_SCOPE = "cpu_kernel"


def _cpu_scoped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        with jax.named_scope(CPU_SCOPE):
            return fn(*args, **kwargs)

    return scoped


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
    """A 3x3 conv, stride 1, padding 1 (x (B, H, W, C_in), kernel (3, 3, C_in, C_out) ->
    (B, H, W, C_out)) whose kernel gradient is summed over `kernel_grad_pieces`."""
    return _same_conv(x, kernel)


@_cpu_scoped
def _conv3x3_forward(x, kernel):
    return _same_conv(x, kernel), (x, kernel)


@_cpu_scoped
def _conv3x3_backward(saved, cotangent):
    x, kernel = saved
    dx = jax.vjp(lambda x: _same_conv(x, kernel), x)[1](cotangent)[0]
    b, h, w, _ = x.shape
    images, rows = kernel_grad_pieces(b, h, w)
    x_rows = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))  # each piece takes its halo rows from here
    dkernel = jnp.zeros(kernel.shape, jnp.float32)
    for i in range(0, b, images):
        for r in range(0, h, rows):
            piece = x_rows[i : i + images, r : r + min(rows, h - r) + 2]
            grad = jax.vjp(lambda k: _same_conv(piece, k, (0, 0)), kernel)[1](cotangent[i : i + images, r : r + rows])[
                0
            ]
            dkernel = dkernel + grad.astype(jnp.float32)
    return dx, dkernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    canonical = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == canonical


@_cpu_scoped
def cpu_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated` with the CPU routes: an NHWC 1x1 conv (stride 1, no padding)
    as a matrix product, an NHWC 3x3 'same' conv through `conv3x3`; any other conv unchanged."""
    plain = (
        _is_nhwc(lhs, rhs, dimension_numbers)
        and feature_group_count == 1
        and precision is None
        and not kwargs.get("preferred_element_type")
        and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str)
    )
    if plain:
        size, pads = tuple(rhs.shape[:2]), tuple(map(tuple, padding))
        if size == (1, 1) and pads == ((0, 0), (0, 0)):
            return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0])
        if size == (3, 3) and pads == ((1, 1), (1, 1)):
            return conv3x3(lhs, rhs)
    kwargs.pop("out_sharding", None)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
        **kwargs,
    )


def _fold_taps(kernel: jax.Array, axis: int) -> jax.Array:
    """Along one axis, nearest x2 followed by a 3-tap filter (padding 1) is, for even outputs
    2i, the taps (k0, k1 + k2) on inputs (i - 1, i) and, for odd outputs 2i + 1, (k0 + k1, k2)
    on (i, i + 1). Returns (output phase, folded tap, ...) with `axis` (3 taps) removed."""
    k0, k1, k2 = (jnp.take(kernel, tap, axis=axis) for tap in range(3))
    return jnp.stack([jnp.stack([k0, k1 + k2]), jnp.stack([k0 + k1, k2])])


def phase_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C_in, C_out) -> the (2, 2, C_in, 4 * C_out) kernel of the four output phases,
    as sums of taps (an einsum with a 0/1 matrix compiles to thin matrix products)."""
    rows = _fold_taps(kernel, 0)  # (a, p, j, C_in, C_out): a the row phase, p the row tap
    both = _fold_taps(rows, 2)  # (b, q, a, p, C_in, C_out)
    phases = both.transpose(3, 1, 4, 2, 0, 5)  # (p, q, C_in, a, b, C_out)
    return phases.reshape(2, 2, kernel.shape[2], 4 * kernel.shape[3])


def box_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C_in, C_out) -> (4, 4, C_in, C_out): along each axis the taps (k0, k0 + k1, k1 + k2,
    k2), the 3x3 kernel convolved with the 2x2 box that turns a zero-dilated image into its
    nearest x2 copy."""
    for axis in (0, 1):
        pad = [(0, 0)] * kernel.ndim
        pad[axis] = (1, 1)
        padded = jnp.pad(kernel, pad)
        kernel = jax.lax.slice_in_dim(padded, 1, None, axis=axis) + jax.lax.slice_in_dim(padded, 0, -1, axis=axis)
    return kernel


def _dilated_conv(x: jax.Array, kernel4: jax.Array) -> jax.Array:
    """(B, H, W, C_in) dilated by 2 under a (4, 4, C_in, C_out) kernel -> (B, 2H, 2W, C_out)."""
    return jax.lax.conv_general_dilated(
        x, kernel4, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_NHWC
    )


def _dilated_conv_kernel_grad_reversed(cotangent: jax.Array, x: jax.Array) -> jax.Array:
    """The gradient of `_dilated_conv`'s kernel, with its taps reversed along both axes: the
    cotangent (padded by 1) under the input as a kernel dilated by 2, contracting over the batch.
    (4, 4, C_in, C_out)."""
    return jax.lax.conv_general_dilated(
        cotangent, x, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2), dimension_numbers=("CHWN", "IHWO", "HWCN")
    )


@jax.custom_jvp
def upsampled_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Nearest x2, then a 3x3 conv (padding 1): (B, H, W, C_in) -> (B, 2H, 2W, C_out).

    Computed without the x2 image, as one transposed conv: the input dilated by 2 (zeros
    between pixels, which the compiler skips) under `box_kernel`, 16 instead of 36
    multiply-adds per input pixel and channel pair, written straight into the (2H, 2W) output.
    Its input gradient is a stride-2 conv of the cotangent. Differentiates in forward and
    reverse mode (a custom JVP, `_upsampled_conv_jvp`).
    """
    return _dilated_conv(x, box_kernel(kernel))


def _upsampled_conv_jvp(primals, tangents):
    """The tangent along the kernel is written as the transpose of the kernel-gradient conv
    (`_dilated_conv_kernel_grad_reversed`), so that reverse mode, transposing it back, forms the
    kernel gradient with the input as the dilated kernel. lax's own rule for a kernel under an
    input-dilated conv makes libtpu reverse the whole (B, 2H, 2W, C_out) cotangent first;
    this form reverses only the (4, 4) kernel."""
    x, kernel = primals
    dx, dkernel = tangents
    kernel4 = box_kernel(kernel)
    y = _dilated_conv(x, kernel4)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_dilated_conv(dx, kernel4))
    if not isinstance(dkernel, SymbolicZero):
        along_kernel = jax.linear_transpose(
            lambda cotangent: jnp.flip(_dilated_conv_kernel_grad_reversed(cotangent, x), (0, 1)),
            jax.ShapeDtypeStruct(y.shape, y.dtype),
        )
        terms.append(along_kernel(box_kernel(dkernel).astype(y.dtype))[0])
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


upsampled_conv.defjvp(_upsampled_conv_jvp, symbolic_zeros=True)


def _upsampled_conv_one_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`upsampled_conv` as one 2x2 conv of 4x the output channels, one per output phase (a, b)
    (pixels (2i + a, 2j + b)), with taps folded from the 3x3 kernel (`phase_kernel`; padding 1,
    (B, H + 1, W + 1, 4 C_out)), then sliced and interleaved: the CPU kernels' form (XLA's CPU
    backend runs one wide conv faster than four narrow ones)."""
    b, h, w, _ = x.shape
    c_out = kernel.shape[-1]
    y = jax.lax.conv_general_dilated(x, phase_kernel(kernel), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    # (B, H + 1, W + 1, 4 * C_out): phase (a, b) of output pixel (i, j) sits at (i + a, j + b)
    y = y.reshape(b, h + 1, w + 1, 2, 2, c_out)
    rows = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c_out)  # (B, H, 2, W, 2, C) -> (B, 2H, 2W, C)


@jax.custom_vjp
def cpu_upsampled_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`upsampled_conv` as one wide conv, with gradients written by hand (`_upsampled_conv_backward`)."""
    return _upsampled_conv_one_conv(x, kernel)


@_cpu_scoped
def _upsampled_conv_forward(x, kernel):
    return _upsampled_conv_one_conv(x, kernel), (x, kernel)


@_cpu_scoped
def _upsampled_conv_backward(saved, cotangent):
    """With z the cotangent laid out like the forward's (H + 1, W + 1, 4 C) output: the input
    gradient is a forward conv of z with the flipped, transposed phase kernel; the kernel
    gradient is four matrix products (one per 2x2 tap) of the shifted input with z, folded
    back to 3x3 through the phase map's own transpose."""
    x, kernel = saved
    b, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    phases, fold_back = jax.vjp(phase_kernel, kernel)
    dy = cotangent.reshape(b, h, 2, w, 2, c_out)
    z = jnp.stack(
        [
            jnp.stack([jnp.pad(dy[:, :, a, :, c], ((0, 0), (a, 1 - a), (c, 1 - c), (0, 0))) for c in (0, 1)], axis=3)
            for a in (0, 1)
        ],
        axis=3,
    ).reshape(b, h + 1, w + 1, 4 * c_out)
    flipped = jnp.flip(phases, (0, 1)).transpose(0, 1, 3, 2)  # (2, 2, 4 C_out, C_in)
    dx = jax.lax.conv_general_dilated(z, flipped, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d_phases = jnp.stack(
        [
            jnp.stack([jnp.einsum("bhwc,bhwo->co", x_pad[:, p : p + h + 1, q : q + w + 1], z) for q in (0, 1)])
            for p in (0, 1)
        ]
    )
    return dx[:, 1 : h + 1, 1 : w + 1].astype(x.dtype), fold_back(d_phases.astype(phases.dtype))[0]


cpu_upsampled_conv.defvjp(_upsampled_conv_forward, _upsampled_conv_backward)


def lax_cond(active: jax.Array, compute: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
    """`compute()` if `active` else `otherwise()` (same structure), skipping the other branch."""
    return jax.lax.cond(active, lambda _: compute(), lambda _: otherwise(), None)


@_cpu_scoped
def select_cond(active: jax.Array, compute: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
    """`compute()` if `active` else `otherwise()`: both run, the result is selected, and the
    program holds no conditional branch."""
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), compute(), otherwise())


def whole_batch(fn: Callable) -> Callable:
    """`fn(params, x)` as it is: the whole batch in each op."""
    return fn


def one_image_at_a_time(fn: Callable) -> Callable:
    """`fn(params, x)` over the batch one image after another (`lax.map`); every image is
    independent (GroupNorm is per image), so the result is that of the whole batch."""

    @_cpu_scoped
    def mapped(params, x):
        if x.shape[0] == 1:
            return fn(params, x)
        return jax.lax.map(lambda image: fn(params, image[None])[0], x)

    return mapped


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One set of kernels. Static (hashable): modules keep it in their graph definition.

    conv_general_dilated: the conv function of every model conv (`nnx.Conv` takes it).
    upsampled_conv: nearest x2 then a 3x3 conv, (x, kernel) -> image.
    cond: (active, compute, otherwise) -> the taken branch's result.
    batch_map: wraps a codec function (params, x) -> y over its batch.
    written_block_backward: whether ResnetBlocks take `models.resnet_branch`'s backward pass
        (fewer activation reads in TPU compiles, more in GPU ones: docs/performance.md) instead
        of autodiff's; a model with a memory setting takes autodiff's (`autoencoder.memory_kernels`).
    """

    name: str
    conv_general_dilated: Callable = dataclasses.field(repr=False)
    upsampled_conv: Callable = dataclasses.field(repr=False)
    cond: Callable = dataclasses.field(repr=False)
    batch_map: Callable = dataclasses.field(repr=False)
    written_block_backward: bool = dataclasses.field(repr=False)


XLA = Kernels("xla", jax.lax.conv_general_dilated, upsampled_conv, lax_cond, whole_batch, True)
GPU = dataclasses.replace(XLA, name="gpu", written_block_backward=False)
CPU = Kernels("cpu", cpu_conv_general_dilated, cpu_upsampled_conv, select_cond, one_image_at_a_time, False)
BY_NAME = {chosen.name: chosen for chosen in (XLA, GPU, CPU)}
SETTINGS: tuple[str, ...] = ("auto", *BY_NAME)  # what `select` takes (config: train.kernels)


def select(setting: str, devices: Iterable[Any]) -> Kernels:
    """The kernels for a program compiled for `devices`: "xla", "gpu" or "cpu" as asked;
    "auto": CPU when every device is a CPU, GPU when every device is a GPU, else XLA (TPUs).
    Raises ValueError for another setting, or for "auto" without devices."""
    if setting in BY_NAME:
        return BY_NAME[setting]
    if setting != "auto":
        raise ValueError(f"kernels setting {setting!r} unknown; use one of {list(SETTINGS)}")
    platforms = {device.platform for device in devices}
    if not platforms:
        raise ValueError("kernels: no devices to compile for")
    if platforms == {"cpu"}:
        return CPU
    return GPU if platforms <= GPU_PLATFORMS else XLA


def for_mesh(setting: str, mesh: jax.sharding.Mesh) -> Kernels:
    """`select(setting, the mesh's devices)`."""
    return select(setting, mesh.devices.flat)
