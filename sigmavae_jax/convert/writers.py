"""Writing converted weights: a sigmavae_jax params export, a diffusers folder, or an
LDM-key safetensors file. Nothing here needs torch (safetensors.numpy writes the files)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from sigmavae_jax import storage
from sigmavae_jax.checkpoint import save_params
from sigmavae_jax.config import Config, ModelConfig, to_dict
from sigmavae_jax.convert.errors import ConversionError, ConversionWarning
from sigmavae_jax.convert.keymaps import to_diffusers_state_dict, to_ldm_state_dict
from sigmavae_jax.convert.readers import EMBEDDED_CONFIG_KEY
from sigmavae_jax.models import params as param_tree

TARGETS = ("jax", "diffusers", "ldm")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"


WEIGHT_FILE_SUFFIXES = (".npz", ".safetensors")  # what the Inception and LPIPS loaders read


def _check_parents(out: storage.Path) -> None:
    """Raises if the nearest existing parent of `out` is a file, so `out` could never be made."""
    if storage.is_remote(out):
        return  # object stores have no folders, so nothing above a key can be in the way
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(
                    f"{out} cannot be created because {parent} is a file, not a folder; choose another path"
                )
            return


def check_output(out: storage.Path, to: str) -> None:
    """Raises before any work is done if `out` cannot be written: never overwrite anything."""
    if to not in TARGETS:
        raise ConversionError(f"output format {to!r} unknown; use one of {list(TARGETS)}")
    _check_parents(out)
    if to == "ldm":
        if out.is_dir():
            raise ConversionError(f"{out} is a folder; --to ldm writes one file, e.g. {out / 'vae.safetensors'}")
        if out.suffix != ".safetensors":
            raise ConversionError(f"--to ldm writes a safetensors file; give a path ending in .safetensors, not {out}")
        if out.exists() and out.stat().st_size > 0:
            raise ConversionError(f"{out} exists; choose a new output file (nothing is overwritten)")
        return
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} is a file; --to {to} writes a folder, give a new folder path")
    if out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty; choose a new output folder (nothing is overwritten)")


def check_weight_file_output(out: storage.Path) -> None:
    """Raises before any work is done unless `out` is a new `.npz` or `.safetensors` file that
    can be created (an Inception or LPIPS weight file): nothing is ever overwritten."""
    if out.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConversionError(f"{out} must end in .npz or .safetensors")
    if out.exists():
        raise ConversionError(f"{out} exists; remove it or choose another path (nothing is overwritten)")
    _check_parents(out)


def check_dtype(dtype: str) -> None:
    if dtype not in param_tree.DTYPES:
        raise ConversionError(f"dtype {dtype!r} unknown; use one of {sorted(param_tree.DTYPES)}")


def cast_params(params: Mapping[Any, Any], dtype: str) -> dict[Any, Any]:
    """Nested params with every array cast to `dtype` ("float32" or "bfloat16") as numpy."""
    target = np.dtype(param_tree.DTYPES[dtype])  # jnp.bfloat16 is the ml_dtypes numpy type
    return {
        key: cast_params(value, dtype) if isinstance(value, Mapping) else np.asarray(value).astype(target, copy=False)
        for key, value in params.items()
    }


def write_jax(out: storage.Path, params: Mapping[Any, Any], config: Config, **export_info: Any) -> storage.Path:
    """A params export that `sigmavae_jax.load(out)` reads."""
    try:
        return save_params(out, dict(params), config, **export_info)
    except FileExistsError as error:
        raise ConversionError(str(error)) from None


def diffusers_config(model: ModelConfig) -> dict[str, Any]:
    """The config.json of a diffusers AutoencoderKL with this architecture."""
    levels = len(model.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [model.ch * m for m in model.ch_mult],
        "layers_per_block": model.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": model.z_channels,
        "norm_num_groups": model.norm_groups,
        "scaling_factor": model.scaling_factor,
        # diffusers SD configs say null for "no shift"; FLUX-style pipelines read a number.
        "shift_factor": model.shift_factor or None,
        "use_quant_conv": model.use_quant_conv,
        "use_post_quant_conv": model.use_post_quant_conv,
        "mid_block_add_attention": model.mid_attention,
        "force_upcast": True,
    }


def _warn_unrepresentable(model: ModelConfig) -> None:
    lost = []
    if model.latent_norm != "none":
        lost.append(f"the latent normalisation ({model.latent_norm}, patch {model.latent_norm_patch})")
    if model.posterior == "deterministic":
        lost.append("the deterministic posterior")
    if lost:
        warnings.warn(
            f"diffusers' AutoencoderKL cannot represent {' and '.join(lost)} (NextStep-1); its "
            "encode() will return the unnormalised Gaussian latent. The weights are exact; use "
            "the jax export (--to jax) to keep the conventions.",
            ConversionWarning,
            stacklevel=3,
        )


def _save_safetensors(tensors: dict[str, np.ndarray], path: storage.Path, model: ModelConfig) -> None:
    from safetensors.numpy import save

    # "format": "pt" tells torch-side loaders these are torch-layout tensors; the embedded
    # config lets this file convert back without guessing groups or scaling factors.
    metadata = {"format": "pt", EMBEDDED_CONFIG_KEY: json.dumps(to_dict(model))}
    storage.write_bytes_atomically(path, save(tensors, metadata=metadata))


def write_diffusers(out: storage.Path, params: Mapping[Any, Any], model: ModelConfig) -> storage.Path:
    """A folder that `diffusers.AutoencoderKL.from_pretrained(out)` loads."""
    _warn_unrepresentable(model)
    state = to_diffusers_state_dict(params, model)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out / DIFFUSERS_WEIGHTS, model)
    (out / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config(model), indent=2) + "\n")
    return out


def write_ldm(out: storage.Path, params: Mapping[Any, Any], model: ModelConfig) -> storage.Path:
    """One safetensors file with LDM/CompVis keys (attention as 1x1 convs)."""
    state = to_ldm_state_dict(params, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out, model)
    return out
