"""The FID Inception-v3 (pytorch-fid's `InceptionV3([3])` with `fid_inception_v3()` weights),
NHWC, in Flax NNX.

    inception = load_inception("inception.npz")
    feats = nnx.jit(lambda m, x: m(x))(inception, images_01)   # (B, H, W, 3) in [0, 1] -> (B, 2048)

The network of the TF1 graph `inception-2015-12-05` that the FID of Heusel et al. 2017 is
defined with, as pytorch-fid ports it: torchvision's Inception-v3 trunk up to Mixed_7c with the
FID-specific blocks (average pools that do not count the zero padding in Mixed_5b-5d, 6b-6e
and 7b; a MAX pool in the pool branch of Mixed_7c), then a global average pool to the 2048-d
features. Every BasicConv2d is conv (no bias) -> BatchNorm (eps 0.001, running statistics)
-> ReLU. The input stage is pytorch-fid's `resize_input=True, normalize_input=True`: bilinear
resize to 299x299 (half-pixel centres, no antialiasing: torch's `F.interpolate(mode="bilinear",
align_corners=False)`), then x * 2 - 1.

The weights are frozen `InceptionWeight` variables (not `nnx.Param`, so an optimizer over
`nnx.Param` never sees them) and pass through `jax.lax.stop_gradient`.

Weight files (`.npz` or `.safetensors`, float32) mirror pytorch-fid's torch names, for each
BasicConv2d `{name}` (e.g. `Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, `Mixed_7c.branch_pool`):

    {name}.conv.kernel   (kh, kw, C_in, C_out)   HWIO (torch: {name}.conv.weight, OIHW)
    {name}.bn.scale      (C_out,)                torch: {name}.bn.weight
    {name}.bn.bias       (C_out,)                torch: {name}.bn.bias
    {name}.bn.mean       (C_out,)                torch: {name}.bn.running_mean
    {name}.bn.var        (C_out,)                torch: {name}.bn.running_var

Make one from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` with
`sigmavae_jax.convert.inception_torch.convert_inception_torch`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmavae_jax.messages import key_summary
from sigmavae_jax.models import weight_files

Precision = str | jax.lax.Precision | None

INPUT_SIZE = 299  # pytorch-fid resizes every image to this before the network
MIN_SIZE = 75  # the smallest side the trunk's strided convs and pools leave >= 1 position for
FEATURE_DIM = 2048
BN_EPS = 0.001  # torchvision's BasicConv2d (the TF graph's value)

TORCH_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

INCEPTION_FIX = (
    f"Convert torch files (.pth) first: python convert_torch_weights.py {TORCH_WEIGHTS_NAME} inception.npz --inception"
)
HOW_TO_GET_WEIGHTS = (
    "FID needs pytorch-fid's Inception-v3 weights. Download "
    f"{TORCH_WEIGHTS_NAME} from the pytorch-fid GitHub releases "
    "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    f"{TORCH_WEIGHTS_NAME}) and convert it: python convert_torch_weights.py "
    f"{TORCH_WEIGHTS_NAME} inception.npz --inception"
)


# ---------------------------------------------------------------------------------------------
# The architecture as data: one table feeds the modules, the weight-file shapes and the torch
# converter, so they cannot drift apart.


class ConvSpec(NamedTuple):
    """One BasicConv2d: its (torch-style) name inside its block and its geometry."""

    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, int]  # (kh, kw)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (ph, pw), as torch's padding=


def _inception_a(c_in: int, pool_features: int) -> list[ConvSpec]:
    return [
        ConvSpec("branch1x1", c_in, 64, (1, 1)),
        ConvSpec("branch5x5_1", c_in, 48, (1, 1)),
        ConvSpec("branch5x5_2", 48, 64, (5, 5), padding=(2, 2)),
        ConvSpec("branch3x3dbl_1", c_in, 64, (1, 1)),
        ConvSpec("branch3x3dbl_2", 64, 96, (3, 3), padding=(1, 1)),
        ConvSpec("branch3x3dbl_3", 96, 96, (3, 3), padding=(1, 1)),
        ConvSpec("branch_pool", c_in, pool_features, (1, 1)),
    ]


def _inception_b(c_in: int) -> list[ConvSpec]:
    return [
        ConvSpec("branch3x3", c_in, 384, (3, 3), stride=2),
        ConvSpec("branch3x3dbl_1", c_in, 64, (1, 1)),
        ConvSpec("branch3x3dbl_2", 64, 96, (3, 3), padding=(1, 1)),
        ConvSpec("branch3x3dbl_3", 96, 96, (3, 3), stride=2),
    ]


def _inception_c(c_in: int, c7: int) -> list[ConvSpec]:
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # the factorised 7x7: 1x7 and 7x1 convs
    return [
        ConvSpec("branch1x1", c_in, 192, (1, 1)),
        ConvSpec("branch7x7_1", c_in, c7, (1, 1)),
        ConvSpec("branch7x7_2", c7, c7, row[0], padding=row[1]),
        ConvSpec("branch7x7_3", c7, 192, col[0], padding=col[1]),
        ConvSpec("branch7x7dbl_1", c_in, c7, (1, 1)),
        ConvSpec("branch7x7dbl_2", c7, c7, col[0], padding=col[1]),
        ConvSpec("branch7x7dbl_3", c7, c7, row[0], padding=row[1]),
        ConvSpec("branch7x7dbl_4", c7, c7, col[0], padding=col[1]),
        ConvSpec("branch7x7dbl_5", c7, 192, row[0], padding=row[1]),
        ConvSpec("branch_pool", c_in, 192, (1, 1)),
    ]


def _inception_d(c_in: int) -> list[ConvSpec]:
    return [
        ConvSpec("branch3x3_1", c_in, 192, (1, 1)),
        ConvSpec("branch3x3_2", 192, 320, (3, 3), stride=2),
        ConvSpec("branch7x7x3_1", c_in, 192, (1, 1)),
        ConvSpec("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
        ConvSpec("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)),
        ConvSpec("branch7x7x3_4", 192, 192, (3, 3), stride=2),
    ]


def _inception_e(c_in: int) -> list[ConvSpec]:
    return [
        ConvSpec("branch1x1", c_in, 320, (1, 1)),
        ConvSpec("branch3x3_1", c_in, 384, (1, 1)),
        ConvSpec("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1)),
        ConvSpec("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0)),
        ConvSpec("branch3x3dbl_1", c_in, 448, (1, 1)),
        ConvSpec("branch3x3dbl_2", 448, 384, (3, 3), padding=(1, 1)),
        ConvSpec("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1)),
        ConvSpec("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0)),
        ConvSpec("branch_pool", c_in, 192, (1, 1)),
    ]


# The stem: BasicConv2d's, with 3x3 stride-2 max pools after Conv2d_2b_3x3 and Conv2d_4a_3x3.
STEM = (
    ConvSpec("Conv2d_1a_3x3", 3, 32, (3, 3), stride=2),
    ConvSpec("Conv2d_2a_3x3", 32, 32, (3, 3)),
    ConvSpec("Conv2d_2b_3x3", 32, 64, (3, 3), padding=(1, 1)),
    ConvSpec("Conv2d_3b_1x1", 64, 80, (1, 1)),
    ConvSpec("Conv2d_4a_3x3", 80, 192, (3, 3)),
)
MAX_POOL_AFTER = ("Conv2d_2b_3x3", "Conv2d_4a_3x3")

# The mixed blocks in order: (name, kind, C_in, extra argument). Kind "E_avg" is pytorch-fid's
# FIDInceptionE_1 (average pool branch), "E_max" its FIDInceptionE_2 (max pool branch).
BLOCKS = (
    ("Mixed_5b", "A", 192, 32),
    ("Mixed_5c", "A", 256, 64),
    ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, None),
    ("Mixed_6b", "C", 768, 128),
    ("Mixed_6c", "C", 768, 160),
    ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, None),
    ("Mixed_7b", "E_avg", 1280, None),
    ("Mixed_7c", "E_max", 2048, None),
)


def block_convs(kind: str, c_in: int, extra: int | None) -> list[ConvSpec]:
    """The BasicConv2d's of one mixed block, names relative to the block."""
    if kind == "A":
        return _inception_a(c_in, extra)
    if kind == "B":
        return _inception_b(c_in)
    if kind == "C":
        return _inception_c(c_in, extra)
    if kind == "D":
        return _inception_d(c_in)
    return _inception_e(c_in)


def inception_conv_specs() -> dict[str, ConvSpec]:
    """Every BasicConv2d in network order: full dotted name (`Mixed_5b.branch1x1`) -> spec."""
    specs = {spec.name: spec for spec in STEM}
    for block, kind, c_in, extra in BLOCKS:
        for spec in block_convs(kind, c_in, extra):
            specs[f"{block}.{spec.name}"] = spec
    return specs


BN_LEAVES = ("scale", "bias", "mean", "var")


def inception_weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every array an Inception weight file must hold: key -> shape, in network order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in inception_conv_specs().items():
        shapes[f"{name}.conv.kernel"] = (*spec.kernel, spec.c_in, spec.c_out)
        for leaf in BN_LEAVES:
            shapes[f"{name}.bn.{leaf}"] = (spec.c_out,)
    return shapes


def check_inception_weights(arrays: Mapping[str, Any], source: str) -> None:
    """Raises ValueError (one line) counting missing, unexpected, mis-shaped and non-float keys of
    `arrays`, and BatchNorm variances below zero (they would turn the features into NaN).

    source: where the arrays came from (a file name), for the message.
    """
    expected = inception_weight_shapes()
    missing = [f"{k} expected {expected[k]}" for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    present = [k for k in expected if k in arrays]
    misshaped = [
        f"{k} got {tuple(np.shape(arrays[k]))} instead of {expected[k]}"
        for k in present
        if tuple(np.shape(arrays[k])) != expected[k]
    ]
    dtypes = {k: np.asarray(arrays[k]).dtype for k in present}
    not_float = [f"{k} has dtype {d}" for k, d in dtypes.items() if d.kind != "f"]
    negative_var = [
        k for k in present if k.endswith(".bn.var") and dtypes[k].kind == "f" and np.any(np.asarray(arrays[k]) < 0)
    ]
    if not (missing or unexpected or misshaped or not_float or negative_var):
        return
    problems = key_summary(
        [
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped", misshaped),
            ("not floating point", not_float),
            ("BatchNorm variances with negative entries", negative_var),
        ]
    )
    raise ValueError(
        f"{source}: not FID Inception-v3 weights in the sigmavae_jax layout: {problems}. {HOW_TO_GET_WEIGHTS}"
    )


# ---------------------------------------------------------------------------------------------
# The network.


class InceptionWeight(nnx.Variable):
    """A pretrained Inception array. Not an `nnx.Param`, so optimizers over `nnx.Param` skip it."""


def _frozen(variable: InceptionWeight) -> jax.Array:
    return jax.lax.stop_gradient(variable[...])


class FrozenKernel(nnx.Module):
    """Holds one conv kernel (HWIO) under the attribute `kernel`, as the file key says."""

    def __init__(self, kernel: Any):
        self.kernel = InceptionWeight(jnp.asarray(kernel, jnp.float32))


class FrozenBatchNorm(nnx.Module):
    """Eval-mode BatchNorm statistics and affine, attributes named as the file keys."""

    def __init__(self, scale: Any, bias: Any, mean: Any, var: Any):
        self.scale = InceptionWeight(jnp.asarray(scale, jnp.float32))
        self.bias = InceptionWeight(jnp.asarray(bias, jnp.float32))
        self.mean = InceptionWeight(jnp.asarray(mean, jnp.float32))
        self.var = InceptionWeight(jnp.asarray(var, jnp.float32))

    def __call__(self, y: jax.Array) -> jax.Array:
        """(..., C) -> (..., C): (y - mean) / sqrt(var + eps) * scale + bias."""
        inv = _frozen(self.scale) * jax.lax.rsqrt(_frozen(self.var) + BN_EPS)
        # One multiply-add per element; the per-channel shift is precomputed on C values.
        return y * inv + (_frozen(self.bias) - _frozen(self.mean) * inv)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running stats) -> ReLU."""

    def __init__(self, weights: Mapping[str, Any], name: str, spec: ConvSpec, *, precision: Precision):
        self.conv = FrozenKernel(weights[f"{name}.conv.kernel"])
        self.bn = FrozenBatchNorm(*(weights[f"{name}.bn.{leaf}"] for leaf in BN_LEAVES))
        self.stride = spec.stride
        self.padding = spec.padding
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', C_out), H' = (H + 2 ph - kh) // stride + 1."""
        (ph, pw), s = self.padding, self.stride
        y = jax.lax.conv_general_dilated(
            x,
            _frozen(self.conv.kernel),
            window_strides=(s, s),
            padding=[(ph, ph), (pw, pw)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        return jax.nn.relu(self.bn(y))


def max_pool_3x3(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """torch's max_pool2d(kernel_size=3, stride, padding=pad) on NHWC; padding never wins."""
    # -inf padding is what torch does; a Python-scalar init lets JAX pick the differentiable
    # reduce_window_max.
    window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    pads = [(0, 0), (pad, pad), (pad, pad), (0, 0)]
    return jax.lax.reduce_window(x, -np.inf, jax.lax.max, window, strides, pads)


def _pixels_per_window(n: int) -> np.ndarray:
    """(n,) how many of positions i-1, i, i+1 lie in [0, n): 3 inside, 2 at an edge."""
    i = np.arange(n)
    return np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """torch's avg_pool2d(3, stride=1, padding=1, count_include_pad=False) on NHWC.

    The FID graph (TF's 'SAME' average pool) divides each window's sum by the number of real
    pixels in it: 9 inside, 6 on an edge, 4 in a corner. torchvision's stock blocks divide by 9
    everywhere, which darkens the borders; pytorch-fid patches that, and so must we.
    """
    pads = [(0, 0), (1, 1), (1, 1), (0, 0)]
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    # The counts depend only on the shape: computed in numpy, they are a compile-time constant.
    h, w = x.shape[1:3]
    rows, cols = _pixels_per_window(h), _pixels_per_window(w)
    counts = (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]
    return sums / counts


class MixedBlock(nnx.Module):
    """One of Inception-v3's mixed blocks (A, B, C, D, or E with an average or max pool branch).

    Attributes are the block's BasicConv2d's under their torch names (`branch1x1`, ...).
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        block: str,
        kind: str,
        c_in: int,
        extra: int | None,
        *,
        precision: Precision,
    ):
        self.kind = kind
        for spec in block_convs(kind, c_in, extra):
            conv = BasicConv2d(weights, f"{block}.{spec.name}", spec, precision=precision)
            setattr(self, spec.name, conv)

    def _chain(self, x: jax.Array, *names: str) -> jax.Array:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', C_out); branches concatenated in torch's order."""
        c = self._chain
        if self.kind == "A":
            branches = [
                c(x, "branch1x1"),
                c(x, "branch5x5_1", "branch5x5_2"),
                c(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                c(avg_pool_3x3_exclude_pad(x), "branch_pool"),
            ]
        elif self.kind == "B":
            branches = [
                c(x, "branch3x3"),
                c(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                max_pool_3x3(x, stride=2),
            ]
        elif self.kind == "C":
            branches = [
                c(x, "branch1x1"),
                c(x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                c(x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
                c(avg_pool_3x3_exclude_pad(x), "branch_pool"),
            ]
        elif self.kind == "D":
            branches = [
                c(x, "branch3x3_1", "branch3x3_2"),
                c(x, "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"),
                max_pool_3x3(x, stride=2),
            ]
        else:  # E: the 3x3 branches end in a 1x3 and a 3x1 conv side by side
            b3 = c(x, "branch3x3_1")
            b3dbl = c(x, "branch3x3dbl_1", "branch3x3dbl_2")
            # The TF graph's last block (Mixed_7c) max-pools here where the paper and
            # torchvision average: pytorch-fid's FIDInceptionE_2 keeps that quirk.
            if self.kind == "E_max":
                pooled = max_pool_3x3(x, stride=1, pad=1)
            else:
                pooled = avg_pool_3x3_exclude_pad(x)
            branches = [
                c(x, "branch1x1"),
                c(b3, "branch3x3_2a"),
                c(b3, "branch3x3_2b"),
                c(b3dbl, "branch3x3dbl_3a"),
                c(b3dbl, "branch3x3dbl_3b"),
                c(pooled, "branch_pool"),
            ]
        return jnp.concatenate(branches, axis=-1)


def fid_preprocess(images_01: jax.Array) -> jax.Array:
    """pytorch-fid's input stage: (B, H, W, 3) in [0, 1] -> (B, 299, 299, 3) in [-1, 1].

    Bilinear resize with half-pixel centres and no antialiasing -- what torch's
    `F.interpolate(mode="bilinear", align_corners=False)` does, also when shrinking -- then
    x * 2 - 1. Images already 299x299 pass the resize unchanged, as in torch.
    """
    x = images_01.astype(jnp.float32)
    b, h, w, c = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)
    return 2.0 * x - 1.0


class FIDInception(nnx.Module):
    """pytorch-fid's FID Inception-v3 up to the 2048-d pool features, on NHWC images.

    Attribute paths equal the weight-file keys: `Conv2d_1a_3x3.conv.kernel`,
    `Mixed_7c.branch_pool.bn.var`, ...

    Args:
      weights: key -> array in the layout of `inception_weight_shapes()` (see the module doc).
      precision: the convs' `jax.lax.Precision`. The default "highest" keeps float32 convs
        float32 on TPU and on GPUs with TF32 (where None would mean reduced-precision passes),
        because FID compares feature statistics with pytorch-fid's float32 ones.
    """

    def __init__(self, weights: Mapping[str, Any], *, precision: Precision = "highest"):
        check_inception_weights(weights, source="Inception weights")
        for spec in STEM:
            setattr(self, spec.name, BasicConv2d(weights, spec.name, spec, precision=precision))
        for block, kind, c_in, extra in BLOCKS:
            setattr(self, block, MixedBlock(weights, block, kind, c_in, extra, precision=precision))

    def features_from_normalized(self, x: jax.Array) -> jax.Array:
        """The network body without the input stage.

        Args:
          x: (B, H, W, 3) float, already resized and scaled to [-1, 1] (pytorch-fid feeds
            299x299); H, W >= 75.
        Returns:
          (B, 2048) float32: Mixed_7c averaged over space.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInception takes (B, H, W, 3) NHWC images; got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"FIDInception's body needs at least {MIN_SIZE}x{MIN_SIZE} inputs; got "
                f"{x.shape[1]}x{x.shape[2]} (pytorch-fid feeds {INPUT_SIZE}x{INPUT_SIZE})"
            )
        x = x.astype(jnp.float32)
        for spec in STEM:
            x = getattr(self, spec.name)(x)
            if spec.name in MAX_POOL_AFTER:
                x = max_pool_3x3(x, stride=2)
        for block, *_ in BLOCKS:
            x = getattr(self, block)(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1, flattened

    def __call__(self, images_01: jax.Array) -> jax.Array:
        """FID features of a batch.

        Args:
          images_01: (B, H, W, 3) float images in [0, 1] (uint8 images / 255, as pytorch-fid's
            ToTensor gives); any H, W.
        Returns:
          (B, 2048) float32 pool features, as pytorch-fid's `InceptionV3([3])(x)[0][:, :, 0, 0]`.
        """
        if images_01.ndim != 4 or images_01.shape[-1] != 3:
            raise ValueError(f"FIDInception takes (B, H, W, 3) NHWC images; got shape {images_01.shape}")
        if not jnp.issubdtype(images_01.dtype, jnp.floating):
            raise ValueError(
                f"FIDInception takes float images in [0, 1]; got dtype {images_01.dtype}. "
                "Convert uint8 images with images.astype(np.float32) / 255."
            )
        return self.features_from_normalized(fid_preprocess(images_01))

    def weights(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays under their file keys (`save_inception_weights`)."""
        state = nnx.state(self, InceptionWeight)
        return {".".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, precision: Precision = "highest") -> "FIDInception":
        """A FIDInception holding the weights of a `.npz` or `.safetensors` weight file."""
        return cls(read_inception_weights(path), precision=precision)


# ---------------------------------------------------------------------------------------------
# Weight files. (File access in models/, as for LPIPS: the network is useless without its
# pretrained weights, and loading them here keeps the layout and its checks in one place.)


INCEPTION_FILES = weight_files.WeightFormat(
    "Inception",
    INCEPTION_FIX,
    HOW_TO_GET_WEIGHTS,
    check_inception_weights,
    inception_weight_shapes,
    {"format": "sigmavae_jax.inception", "net": "fid_inception_v3"},
)


def read_inception_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checked float32 arrays of an Inception weight file (`.npz` or `.safetensors`)."""
    return INCEPTION_FILES.read(path)


def save_inception_weights(path: str | os.PathLike, arrays: Mapping[str, Any]) -> pathlib.Path:
    """Writes checked Inception weights to `path` (`.npz` or `.safetensors`, float32); returns it.

    The file appears whole or not at all (written to a temporary name, then renamed).
    """
    return INCEPTION_FILES.save(path, arrays)


def load_inception(path: str | os.PathLike, *, precision: Precision = "highest") -> FIDInception:
    """The FID Inception with pretrained weights from `path` (`.npz`/`.safetensors`, made by
    `convert_inception_torch`). A missing file raises FileNotFoundError saying how to get one.
    """
    return FIDInception.from_file(path, precision=precision)
