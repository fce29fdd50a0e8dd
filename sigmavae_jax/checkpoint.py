"""Orbax checkpoints. For now: the params-only export that the converter writes and
`sigmavae_jax.load`, `train.py --init` and `eval.py` read.

A params export is a directory:
    params/       an Orbax (StandardCheckpointer) pytree of arrays
    config.yaml   the full config (usable as `--config`)
    export.json   what wrote it and from what
The checkpointer knows nothing of models: params are a nested dict of arrays.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import orbax.checkpoint as ocp
import yaml

from sigmavae_jax.config import Config, from_dict, to_dict

PARAMS_DIR, CONFIG_FILE, EXPORT_FILE = "params", "config.yaml", "export.json"
FORMAT = "sigmavae_jax.params/1"


def is_params_export(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def save_params(
    path: str | pathlib.Path, params: dict[str, Any], config: Config, **export_info: Any
) -> pathlib.Path:
    """Writes `params` (nested dict of arrays) and `config` to the directory `path`.

    Refuses to overwrite an existing non-empty directory, so nothing is lost by a typo.
    """
    path = pathlib.Path(path).resolve()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, _string_keys(params))
    checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    info = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **export_info}
    (path / EXPORT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return path


def load_params(path: str | pathlib.Path) -> tuple[dict[str, Any], Config]:
    """Reads a params export: (nested dict of arrays with list indices as ints, config)."""
    path = pathlib.Path(path).resolve()
    if not is_params_export(path):
        raise FileNotFoundError(
            f"{path} is not a sigmavae_jax params export (expected {PARAMS_DIR}/ and "
            f"{CONFIG_FILE}); convert torch weights with `python convert_torch_weights.py SRC {path}`"
        )
    config = from_dict(yaml.safe_load((path / CONFIG_FILE).read_text()) or {}, str(path / CONFIG_FILE))
    restored = ocp.StandardCheckpointer().restore(path / PARAMS_DIR)
    return _int_keys(restored), config


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; list indices of NNX states are ints."""
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree
