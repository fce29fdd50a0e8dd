"""Reading a PyTorch VAE: safetensors files, torch pickles and model folders.

A reader lists every tensor's name, shape and dtype up front and reads values one at a time
on request, so the converter can check names and shapes before it touches any data, and a
full Stable Diffusion checkpoint never has its UNet converted. Values come back as float32
numpy arrays; fp16 and bf16 upcast exactly.

safetensors are read without torch. torch is imported only for .ckpt/.pt/.pth/.bin files.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from sigmavae_jax.checkpoint import is_params_export
from sigmavae_jax.convert.errors import ConversionError, SourceNotFoundError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")

# Dicts that training frameworks wrap a state dict in: Lightning's {"state_dict": ...},
# and {"model": ...} / {"module": ...} from plain and DDP training loops.
WRAPPER_KEYS = ("state_dict", "model", "module")

# Weight files inside model folders, in order of preference. A diffusers VAE folder holds
# config.json + diffusion_pytorch_model.*; a NextStep-1 tokenizer folder config.json +
# checkpoint.pt; a whole diffusers pipeline keeps its VAE in vae/.
FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "checkpoint.pt",
)
SIDE_CONFIG = "config.json"
# safetensors metadata key under which our writers store the model config, so that a file
# we wrote converts back with its GroupNorm groups and latent conventions.
EMBEDDED_CONFIG_KEY = "sigmavae_jax.model_config"

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: "float32", "float16", "bfloat16", ...


class WeightsFile(Protocol):
    path: pathlib.Path
    tensors: dict[str, TensorInfo]  # every tensor in the state dict, by its name in the file
    non_tensors: list[str]  # state-dict entries that are not tensors (ignored)
    nesting: list[str]  # wrapper keys descended into, e.g. ["state_dict"]

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a float32 numpy array in the file's own (torch) layout."""

    def close(self) -> None: ...


def corrupt_file_error(path: pathlib.Path, detail: Any) -> ConversionError:
    return ConversionError(
        f"{path}: cannot read it; the file is truncated or corrupt ({detail}). "
        "Download or copy it again and compare its size with the original."
    )


def _check_float(path: pathlib.Path, key: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(f"{path}: tensor {key!r} has dtype {dtype}; VAE weights must be floating point")


class SafetensorsFile:
    """A .safetensors file, memory-mapped through `safetensors.safe_open` (numpy, no torch)."""

    def __init__(self, path: pathlib.Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self.nesting: list[str] = []  # safetensors files are flat
        self.non_tensors: list[str] = []
        self._errors = (SafetensorError, OSError, ValueError)
        try:
            self._handle = safe_open(str(path), framework="numpy")
            self.metadata: dict[str, str] = self._handle.metadata() or {}
            self.tensors = {}
            for key in self._handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                view = self._handle.get_slice(key)
                dtype = view.get_dtype()
                self.tensors[key] = TensorInfo(tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower()))
        except self._errors as error:
            raise corrupt_file_error(path, error) from None

    def read(self, key: str) -> np.ndarray:
        _check_float(self.path, key, self.tensors[key].dtype)
        try:
            value = self._handle.get_tensor(key)
        except TypeError as error:  # an old safetensors without ml_dtypes support
            raise ConversionError(
                f"{self.path}: safetensors cannot read {key!r} ({self.tensors[key].dtype}) into "
                f"numpy ({error}); upgrade it: pip install -U safetensors"
            ) from None
        except self._errors as error:
            raise corrupt_file_error(self.path, error) from None
        return value.astype(np.float32)  # bf16/fp16 -> float32 is exact

    def close(self) -> None:
        self._handle = None


def _import_torch(path: pathlib.Path):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path} needs PyTorch, which is not installed: "
            "pip install 'sigmavae_jax[torch]' (or convert the file to .safetensors elsewhere)"
        ) from None
    return torch


def _untrusted_objects_error(path: pathlib.Path, error: Exception) -> ConversionError:
    detail = str(error)
    marker = "Unsupported global:"
    if marker in detail:
        detail = detail[detail.index(marker) :].split(" was not")[0]
    return ConversionError(
        f"{path}: torch will not load it with weights_only=True because it holds Python "
        f"objects besides tensors ({detail}). If you trust the file, save its tensors as "
        "safetensors and convert that: "
        'python -c "import torch, safetensors.torch as s; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = sd.get('state_dict', sd); "
        "s.save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, "
        "'vae.safetensors')\""
    )


class TorchFile:
    """A torch pickle (.ckpt/.pt/.pth/.bin) read with `weights_only=True`.

    Zip-format files are memory-mapped, so only the tensors that are read take memory.
    """

    def __init__(self, path: pathlib.Path):
        torch = _import_torch(path)
        self.path = path
        try:
            # mmap needs the zip format (torch >= 1.6); legacy pickles load fully.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except TORCH_LOAD_ERRORS as error:
            raise torch_load_error(path, error) from None
        state, self.nesting = _find_state_dict(obj, path, torch.is_tensor)
        self._state = {str(k): v for k, v in state.items() if torch.is_tensor(v)}
        self.non_tensors = [str(k) for k, v in state.items() if not torch.is_tensor(v)]
        self.tensors = {
            key: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in self._state.items()
        }
        self._torch = torch

    def read(self, key: str) -> np.ndarray:
        _check_float(self.path, key, self.tensors[key].dtype)
        # Upcasting fp16/bf16 to float32 is exact; numpy has no bf16, so it happens in torch.
        return self._state[key].detach().to(self._torch.float32).contiguous().numpy().copy()

    def close(self) -> None:
        self._state = {}


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# What torch.load raises for a file it cannot read: refused or broken pickles, truncated zip
# archives, short reads, I/O errors.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile)
# torch >= 2.6 puts its diagnosis after this marker, behind a preamble that advises retrying
# with weights_only=False: wrong for a corrupt file, and unsafe for an untrusted one.
_UNPICKLER_MARKER = "WeightsUnpickler error:"


def _torch_detail(error: Exception) -> str:
    text = str(error)
    if _UNPICKLER_MARKER in text:
        text = text.split(_UNPICKLER_MARKER, 1)[1].split("Check the documentation of torch.load")[0]
        return " ".join(text.split()) or type(error).__name__
    return _first_line(error)


def torch_load_error(path: pathlib.Path, error: Exception) -> ConversionError:
    """The one-line ConversionError for a failed `torch.load(path, weights_only=True)`.

    Names a file that is not a torch checkpoint at all (neither the zip archive nor the pickle
    that torch.save writes) as such, never passes on torch's advice to load with
    weights_only=False, and explains files refused for holding Python objects.
    """
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
        return _untrusted_objects_error(path, error)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:  # torch.load reads those with safetensors
        try:
            not_torch = _sniff_format(path) is None
        except OSError:  # unreadable: pass on torch's reason rather than guess at the contents
            not_torch = False
        if not_torch:
            return ConversionError(
                f"{path}: not a torch checkpoint (torch.save writes a zip archive or a pickle, and "
                "this file is neither); give the .pth/.pt/.ckpt weights file itself"
            )
    return corrupt_file_error(path, _torch_detail(error))


def _find_state_dict(obj: Any, path: pathlib.Path, is_tensor) -> tuple[Mapping, list[str]]:
    """Descends through wrapper dicts ({"state_dict": {...}}) to the dict that holds tensors."""
    nesting: list[str] = []
    node = obj
    while True:
        if not isinstance(node, Mapping):
            where = "".join(f"[{k!r}]" for k in nesting)
            raise ConversionError(f"{path}{where} is a {type(node).__name__}, not a dict of tensors (a state dict)")
        if any(is_tensor(v) for v in node.values()):
            return node, nesting
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(node.get(k), Mapping)), None)
        if wrapper is None:
            where = "".join(f"[{k!r}]" for k in nesting) or " (top level)"
            keys = [str(k) for k in list(node)[:10]]
            raise ConversionError(
                f"{path}: no tensors found{where}; keys there: {keys}. Expected a state dict, "
                f"possibly wrapped under one of {list(WRAPPER_KEYS)}"
            )
        nesting.append(wrapper)
        node = node[wrapper]


def _sniff_format(path: pathlib.Path) -> str | None:
    """'safetensors', 'torch' or None, from the first bytes of a file with an unknown suffix."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive or raw pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    return None


def open_weights(path: pathlib.Path) -> WeightsFile:
    """The reader for one weights file, chosen by suffix (or by content if the suffix is unknown)."""
    suffix = path.suffix.lower()
    kind = (
        "safetensors"
        if suffix in SAFETENSORS_SUFFIXES
        else "torch"
        if suffix in TORCH_SUFFIXES
        else _sniff_format(path)
    )
    if kind is None:
        raise ConversionError(
            f"{path}: unknown weights format; expected {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    return SafetensorsFile(path) if kind == "safetensors" else TorchFile(path)


@dataclasses.dataclass
class Source:
    """What SRC resolved to: the weights file and the config that came with it, if any
    (a folder's config.json, or the model config embedded in a file we wrote)."""

    weights: WeightsFile
    side_config: dict[str, Any] | None = None
    side_label: str = ""  # where side_config came from, for messages

    @property
    def path(self) -> pathlib.Path:
        return self.weights.path


def read_side_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _folder_weights(folder: pathlib.Path) -> pathlib.Path:
    for root in (folder, folder / "vae"):
        for name in FOLDER_WEIGHTS:
            if (root / name).is_file():
                return root / name
    found = sorted(p.name for p in folder.iterdir())[:15]
    raise ConversionError(
        f"{folder} is a folder without VAE weights. Expected a diffusers folder "
        f"({SIDE_CONFIG} + diffusion_pytorch_model.safetensors or .bin, possibly under vae/) or "
        f"a NextStep-1 folder ({SIDE_CONFIG} + checkpoint.pt); found {found}"
    )


def open_source(src: str | pathlib.Path) -> Source:
    """Resolves SRC (a weights file or a model folder) into an open `Source`."""
    path = pathlib.Path(src).expanduser()
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_params_export(path):
            raise ConversionError(f"{path} is already a sigmavae_jax params export; load it with sigmavae_jax.load()")
        path = _folder_weights(path)
    # A config.json belongs to the weights only beside a folder's own weights file; next to
    # an arbitrary file (ae.safetensors, a .ckpt) it may describe something else.
    side_path = path.parent / SIDE_CONFIG
    weights = open_weights(path)
    if path.name in FOLDER_WEIGHTS and side_path.is_file():
        return Source(weights, read_side_config(side_path), str(side_path))
    embedded = getattr(weights, "metadata", {}).get(EMBEDDED_CONFIG_KEY)
    if embedded is not None:
        try:
            model = json.loads(embedded)
        except json.JSONDecodeError as error:
            raise ConversionError(f"{path}: metadata {EMBEDDED_CONFIG_KEY} is not valid JSON ({error})") from None
        return Source(weights, {"sigmavae_jax_model": model}, f"the metadata of {path}")
    return Source(weights)
