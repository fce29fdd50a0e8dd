"""pytorch-fid's Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth`) -> this
project's Inception weight file.

    convert_inception_torch("pt_inception-2015-12-05-6726825d.pth", "inception.npz")
    inception = sigmavae_jax.models.inception.load_inception("inception.npz")

pytorch-fid's file is the state dict of `fid_inception_v3()` (torchvision's Inception3 with
1008 classes, no AuxLogits): for each BasicConv2d `{name}` (`Conv2d_1a_3x3`,
`Mixed_5b.branch1x1`, ...) the keys `{name}.conv.weight` (C_out, C_in, kh, kw) and
`{name}.bn.weight/bias/running_mean/running_var` (C_out,), and possibly
`{name}.bn.num_batches_tracked`; plus the classifier `fc.weight` (1008, 2048) and `fc.bias`.
The classifier and the batch counters are not needed for the pool features and are dropped;
kernels go from OIHW to HWIO; BatchNorm names become `bn.scale/bias/mean/var`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from sigmavae_jax import storage
from sigmavae_jax.convert.errors import ConversionError, SourceNotFoundError, shape_str
from sigmavae_jax.convert.lpips_torch import read_torch_state_dict
from sigmavae_jax.convert.writers import check_weight_file_output
from sigmavae_jax.messages import key_summary
from sigmavae_jax.models.inception import (
    FEATURE_DIM,
    TORCH_WEIGHTS_NAME,
    inception_conv_specs,
    save_inception_weights,
)

NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes + 8 unused
# torch BatchNorm name -> this project's name (the file layout of models/inception.py).
BN_TORCH_TO_OURS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
IGNORED_SUFFIX = ".num_batches_tracked"  # a training counter, int64; eval never reads it
FC_SHAPES = {"fc.weight": (NUM_CLASSES, FEATURE_DIM), "fc.bias": (NUM_CLASSES,)}


def torch_inception_shapes(*, include_fc: bool = False) -> dict[str, tuple[int, ...]]:
    """pytorch-fid's state-dict key -> torch shape, without the `num_batches_tracked` counters.

    include_fc: add the unused classifier (`fc.weight`, `fc.bias`), which a strict
    `load_state_dict` of a torch Inception (torch-fidelity's, pytorch-fid's) requires.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in inception_conv_specs().items():
        shapes[f"{name}.conv.weight"] = (spec.c_out, spec.c_in, *spec.kernel)
        for leaf in BN_TORCH_TO_OURS:
            shapes[f"{name}.bn.{leaf}"] = (spec.c_out,)
    if include_fc:
        shapes.update(FC_SHAPES)
    return shapes


def _check_torch_keys(state: Mapping[str, np.ndarray], source: str) -> None:
    """Raises one ConversionError counting the missing, unexpected and mis-shaped keys and
    naming the first few of each, on one line."""
    expected = torch_inception_shapes()
    # The classifier is optional, but if present its shape tells the FID weights (1008
    # classes) from torchvision's ImageNet Inception (1000), which gives different features.
    optional = FC_SHAPES
    missing = [f"{k} expected {shape_str(v)}" for k, v in expected.items() if k not in state]
    unexpected = [k for k in state if k not in expected and k not in optional and not k.endswith(IGNORED_SUFFIX)]
    misshaped = [
        f"{k} got {shape_str(np.shape(state[k]))} instead of {shape_str(shape)}"
        for k, shape in {**expected, **optional}.items()
        if k in state and tuple(np.shape(state[k])) != tuple(shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    problems = key_summary([("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", misshaped)])
    message = f"{source}: not pytorch-fid's FID Inception-v3 state dict ({TORCH_WEIGHTS_NAME}): {problems}"
    if any(k.startswith("AuxLogits.") for k in unexpected) or any(k.startswith("fc.") for k in misshaped):
        message += (
            ". This looks like torchvision's ImageNet Inception-v3 (AuxLogits / 1000 classes). "
            f"FID needs pytorch-fid's weights, {TORCH_WEIGHTS_NAME}, from the pytorch-fid "
            "GitHub releases."
        )
    raise ConversionError(message)


def inception_arrays_from_torch(
    state: Mapping[str, Any], *, source: str = "Inception state dict"
) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict (numpy arrays, torch layout) -> arrays in this project's layout.

    Args:
      state: torch key -> array, as in the module doc; `fc.*` and `*.num_batches_tracked`
        are ignored, anything else unknown is an error.
      source: where it came from, for error messages.
    Returns:
      `{name}.conv.kernel` (kh, kw, C_in, C_out) and `{name}.bn.{scale,bias,mean,var}`
      (C_out,), float32.
    Raises:
      ConversionError counting every missing, unexpected and mis-shaped key at once.
    """
    _check_torch_keys(state, source)
    oihw_to_hwio = (2, 3, 1, 0)
    arrays: dict[str, np.ndarray] = {}
    for name in inception_conv_specs():
        weight = np.asarray(state[f"{name}.conv.weight"], np.float32)
        arrays[f"{name}.conv.kernel"] = np.ascontiguousarray(weight.transpose(oihw_to_hwio))
        for torch_leaf, leaf in BN_TORCH_TO_OURS.items():
            arrays[f"{name}.bn.{leaf}"] = np.asarray(state[f"{name}.bn.{torch_leaf}"], np.float32)
    return arrays


def read_inception_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The float tensors of pytorch-fid's `.pth` as float32 numpy arrays (torch layout).

    `*.num_batches_tracked` (int64 counters) are skipped; any other non-float tensor is an
    error. Loaded with `weights_only=True`: a file that needs arbitrary Python objects is refused.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise SourceNotFoundError(
            f"{path}: no such file or folder; download {TORCH_WEIGHTS_NAME} from the "
            "pytorch-fid GitHub releases (https://github.com/mseitzer/pytorch-fid/releases/"
            f"download/fid_weights/{TORCH_WEIGHTS_NAME})"
        )
    return read_torch_state_dict(path, skip_suffixes=(IGNORED_SUFFIX,), alternative="")


def convert_inception_torch(pth_path: str | os.PathLike, out_path: str | os.PathLike) -> storage.Path:
    """Converts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` into an Inception file.

    Args:
      pth_path: the torch state dict (pytorch-fid's FID weights).
      out_path: the file to write, `.npz` or `.safetensors` (read it with `load_inception`).
    Returns:
      out_path as a Path.
    Raises:
      ConversionError (one line, naming the file) before reading anything if out_path exists,
      cannot be created or has another suffix, and for a missing, unreadable or wrong pth_path;
      out_path is then not written.
    """
    out_path = storage.path(out_path)
    # Checked before reading, so a typo does not cost a full conversion.
    check_weight_file_output(out_path)
    state = read_inception_state_dict(pth_path)
    arrays = inception_arrays_from_torch(state, source=str(pth_path))
    return save_inception_weights(out_path, arrays)
