"""sigmavae_jax: AutoencoderKL with Sigma-VAE noise regularisation in JAX/Flax NNX.

`load`, `Codec` and `build_model` are imported on first use, so that `import sigmavae_jax`
(and the command lines' --help) does not load JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the one place; pyproject.toml reads it (dynamic version)

# public name -> the module that defines it
_LAZY = {"Codec": "sigmavae_jax.api", "build_model": "sigmavae_jax.api", "load": "sigmavae_jax.hub"}

__all__ = ["Codec", "__version__", "build_model", "load"]

if TYPE_CHECKING:
    from sigmavae_jax.api import Codec, build_model
    from sigmavae_jax.hub import load


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sigmavae_jax' has no attribute {name!r}")
