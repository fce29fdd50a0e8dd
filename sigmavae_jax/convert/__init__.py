"""PyTorch AutoencoderKL weights (SD, SDXL, FLUX, NextStep-1; LDM or diffusers keys) to
sigmavae_jax params, and back to diffusers / LDM files.

    from sigmavae_jax.convert import load_torch_weights, convert
    converted = load_torch_weights("ae.safetensors")            # params + inferred config
    convert("sdxl_vae.safetensors", "out/sdxl", config="sdxl")  # what convert_torch_weights.py runs

Modules: readers (files and folders -> tensors), keymaps (names and array layouts),
infer (the model config), writers (output formats), pipeline (the steps in order).
"""

from sigmavae_jax.convert.errors import ConversionError, ConversionWarning
from sigmavae_jax.convert.keymaps import to_diffusers_state_dict, to_ldm_state_dict
from sigmavae_jax.convert.pipeline import (
    Converted,
    convert,
    format_summary,
    load_params_export,
    load_torch_weights,
)
from sigmavae_jax.convert.writers import TARGETS, diffusers_config

__all__ = [
    "TARGETS",
    "ConversionError",
    "ConversionWarning",
    "Converted",
    "convert",
    "diffusers_config",
    "format_summary",
    "load_params_export",
    "load_torch_weights",
    "to_diffusers_state_dict",
    "to_ldm_state_dict",
]
