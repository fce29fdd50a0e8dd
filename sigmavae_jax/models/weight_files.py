"""Weight files of the frozen pretrained networks (LPIPS, FID Inception): flat dicts of
float32 arrays in `.npz` or `.safetensors`, read without pickle and written atomically.

(The only file access under models/: these networks are useless without their weights.)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

WEIGHT_SUFFIXES = (".npz", ".safetensors")


def check_suffix(path: pathlib.Path, what: str, fix: str) -> None:
    """ValueError unless `path` ends in .npz or .safetensors; `fix` says what to do instead."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: {what} weight files end in {' or '.join(WEIGHT_SUFFIXES)}, not {path.suffix!r}. {fix}")


def read_arrays(path: pathlib.Path, what: str, how_to_get: str) -> dict[str, np.ndarray]:
    """The raw arrays of a weight file; clear errors for a missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file {path} does not exist. {how_to_get}")
    try:
        if path.suffix == ".npz":
            # allow_pickle=False: a weight file never needs to run code to load.
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        from safetensors.numpy import load_file

        return load_file(path)
    except Exception as error:  # zipfile, numpy and safetensors each raise their own types
        raise ValueError(
            f"{path}: cannot read it as {path.suffix} ({type(error).__name__}: {error}). "
            f"The file is truncated, corrupt or of another format; write it again. {how_to_get}"
        ) from None


def write_arrays(path: pathlib.Path, arrays: Mapping[str, Any], metadata: dict[str, str]) -> pathlib.Path:
    """Writes float32 `arrays` (in their order) to `path`; the file appears whole or not at all
    (written to a temporary name, then renamed)."""
    arrays = {key: np.ascontiguousarray(np.asarray(value, np.float32)) for key, value in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **arrays)
            else:
                from safetensors.numpy import save

                f.write(save(arrays, metadata=metadata))
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
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
        path = pathlib.Path(path)
        check_suffix(path, self.what, self.fix)
        arrays = read_arrays(path, self.what, self.how_to_get)
        self.check(arrays, source=str(path))
        return {key: np.asarray(value, np.float32) for key, value in arrays.items()}

    def save(self, path: str | os.PathLike, arrays: Mapping[str, Any]) -> pathlib.Path:
        """Writes checked arrays to `path` (`.npz` or `.safetensors`, float32, in file order);
        the file appears whole or not at all. Returns the path."""
        path = pathlib.Path(path)
        check_suffix(path, self.what, self.fix)
        self.check(arrays, source=f"arrays to save to {path}")
        return write_arrays(path, {key: arrays[key] for key in self.shapes()}, self.metadata)
