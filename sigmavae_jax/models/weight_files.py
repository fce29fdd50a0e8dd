"""Weight files of the frozen pretrained networks (LPIPS, FID Inception): flat dicts of
float32 arrays in `.npz` or `.safetensors`, read without pickle and written atomically.

(The only file access under models/: these networks are useless without their weights.)
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Mapping

import numpy as np

from sigmavae_jax import storage

WEIGHT_SUFFIXES = (".npz", ".safetensors")


def check_suffix(path: storage.Path, what: str, fix: str) -> None:
    """ValueError unless `path` ends in .npz or .safetensors; `fix` says what to do instead."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"{path}: {what} weight files end in {' or '.join(WEIGHT_SUFFIXES)}, not {path.suffix!r}. {fix}"
        )


def read_arrays(path: storage.Path, what: str, how_to_get: str) -> dict[str, np.ndarray]:
    """The raw arrays of a weight file (local or gs://); clear errors for a missing or
    unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file {path} does not exist. {how_to_get}")
    try:
        with storage.local_copy(path) as local:
            if path.suffix == ".npz":
                # allow_pickle=False: a weight file never needs to run code to load.
                with np.load(local, allow_pickle=False) as npz:
                    return {key: npz[key] for key in npz.files}
            from safetensors.numpy import load_file

            return load_file(local)
    except Exception as error:  # zipfile, numpy and safetensors each raise their own types
        raise ValueError(
            f"{path}: cannot read it as {path.suffix} ({type(error).__name__}: {error}). "
            f"The file is truncated, corrupt or of another format; write it again. {how_to_get}"
        ) from None


def write_arrays(path: storage.Path, arrays: Mapping[str, Any], metadata: dict[str, str]) -> storage.Path:
    """Writes float32 `arrays` (in their order) to `path` (local or gs://); the file appears
    whole or not at all."""
    arrays = {key: np.ascontiguousarray(np.asarray(value, np.float32)) for key, value in arrays.items()}
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
    else:
        from safetensors.numpy import save

        data = save(arrays, metadata=metadata)
    storage.write_bytes_atomically(path, data)
    return path


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One network's weight files: what they hold, how they are checked and written.

    what: the network's name in messages; fix: what to do about a wrong suffix; how_to_get:
    where weights come from; check(arrays, source=...) raises on a wrong layout; shapes():
    the keys in file order; metadata: written into safetensors headers.
    """

    what: str
    fix: str
    how_to_get: str
    check: Callable[..., None]
    shapes: Callable[[], Mapping[str, tuple[int, ...]]]
    metadata: dict[str, str]

    def read(self, path: str | os.PathLike) -> dict[str, np.ndarray]:
        """The checked float32 arrays of a `.npz` or `.safetensors` file."""
        path = storage.reachable(path)
        check_suffix(path, self.what, self.fix)
        arrays = read_arrays(path, self.what, self.how_to_get)
        self.check(arrays, source=str(path))
        return {key: np.asarray(value, np.float32) for key, value in arrays.items()}

    def save(self, path: str | os.PathLike, arrays: Mapping[str, Any]) -> storage.Path:
        """Writes checked arrays to `path` (`.npz` or `.safetensors`, float32, in file order);
        the file appears whole or not at all. Returns the path."""
        path = storage.reachable(path)
        check_suffix(path, self.what, self.fix)
        self.check(arrays, source=f"arrays to save to {path}")
        return write_arrays(path, {key: arrays[key] for key in self.shapes()}, self.metadata)
