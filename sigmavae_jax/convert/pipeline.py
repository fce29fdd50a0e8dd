"""The conversion: open the source, find the VAE, infer the config, check every key, read
the tensors into our layout, write the requested format."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
import warnings
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sigmavae_jax import storage
from sigmavae_jax.checkpoint import is_params_export, load_params
from sigmavae_jax.config import Config, ModelConfig, to_dict
from sigmavae_jax.convert import infer, keymaps, readers, writers
from sigmavae_jax.convert.errors import ConversionError, ConversionWarning, shape_str
from sigmavae_jax.messages import key_summary
from sigmavae_jax.models import params as param_tree

ConfigArg = str | os.PathLike | Config | ModelConfig | None


@dataclasses.dataclass(frozen=True)
class Converted:
    """A PyTorch VAE in our layout.

    params: nested dict like `nnx.state(model, nnx.Param).to_pure_dict()` (list indices are
    ints), float32 numpy arrays: conv kernels (k, k, C_in, C_out), attention (C_in, C_out).
    """

    config: Config
    params: dict
    layout: str  # "ldm" or "diffusers" ("jax" for a params export read back)
    ignored_keys: list[str]  # tensors in the file that are not part of the VAE
    source_dtypes: list[str]  # e.g. ["float32"] or ["bfloat16"]
    source: str = ""  # the weights file that was read
    warnings: list[str] = dataclasses.field(default_factory=list)


def _describe(model: ModelConfig) -> str:
    return (
        f"ch={model.ch} ch_mult={list(model.ch_mult)} num_res_blocks={model.num_res_blocks} "
        f"z_channels={model.z_channels} quant_conv={model.use_quant_conv} "
        f"post_quant_conv={model.use_post_quant_conv} mid_attention={model.mid_attention}"
    )


def _plan(
    canonical: dict[str, str],
    tensors: dict[str, readers.TensorInfo],
    layout: str,
    prefix: str,
    model: ModelConfig,
    origin: str,
    path: pathlib.Path,
) -> list[tuple[keymaps.ParamSlot, str]]:
    """Pairs every model parameter with exactly one source tensor (by file name).

    Raises ONE ConversionError, on one line, counting the missing, unexpected and mis-shaped
    tensors and naming the first few of each as they are named and shaped in the source file,
    so they can be found there.
    """
    n_levels = len(model.ch_mult)
    plan, missing, misshaped = [], [], []
    for slot in keymaps.param_slots(model):
        expected = shape_str(keymaps.torch_shape(slot.kind, slot.shape, layout))
        name = canonical.get(slot.ldm_key)
        if name is None:
            missing.append(f"{keymaps.source_name(slot.ldm_key, layout, n_levels, prefix)} expected {expected}")
        elif not keymaps.accepts_torch_shape(slot.kind, slot.shape, tensors[name].shape):
            misshaped.append(f"{name} got {shape_str(tensors[name].shape)} instead of {expected}")
        else:
            plan.append((slot, name))
    used = {slot.ldm_key for slot in keymaps.param_slots(model)}
    unexpected = [f"{name} {shape_str(tensors[name].shape)}" for key, name in canonical.items() if key not in used]
    if not (missing or unexpected or misshaped):
        return plan
    problems = key_summary([("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)])
    message = f"{path} ({layout} keys) does not fit the model ({_describe(model)}; {origin}): {problems}"
    if any(".attn." in line for line in unexpected):
        message += (
            ". Attention blocks inside the down/up levels (e.g. encoder.down.N.attn) are not "
            "supported: this model has attention only in the mid blocks."
        )
    raise ConversionError(message)


def _emit(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, ConversionWarning, stacklevel=3)


def load_torch_weights(src: str | os.PathLike, config: ConfigArg = None, *, progress: bool | None = None) -> Converted:
    """Reads a PyTorch AutoencoderKL (SD/SDXL/FLUX/NextStep-1; LDM or diffusers keys) into
    our params and config.

    src: a .safetensors / .ckpt / .pt / .pth / .bin file, a diffusers folder (also with the
    VAE in vae/) or a NextStep-1 folder (config.json + checkpoint.pt).
    config: None (infer everything), a config name or YAML path, a Config or a ModelConfig;
    if given, the architecture in the weights must match it and the latent conventions
    (posterior, latent norm, noise, scale/shift) are taken from it.
    progress: a tqdm bar over the tensors; None shows it only on a terminal.

    Raises ConversionError for unreadable files, missing/unexpected/mis-shaped tensors and
    config mismatches. Warnings (ConversionWarning) say what had to be assumed.
    """
    if is_params_export(src):
        raise ConversionError(
            f"{src} is a sigmavae_jax params export, not PyTorch weights; load it with "
            "sigmavae_jax.load(), or export it with convert(src, out, to='diffusers' or 'ldm')"
        )
    given, given_label = infer.as_config(config)
    source = readers.open_source(src)
    try:
        weights = source.weights
        vae = keymaps.select_vae_keys(weights.tensors)
        layout = keymaps.detect_layout(vae.names)
        n_levels = keymaps.count_levels(vae.names, layout)
        canonical = keymaps.canonical_names(vae, layout, n_levels)
        shapes = {key: weights.tensors[name].shape for key, name in canonical.items()}
        config_obj, notes = infer.resolve_config(
            infer.architecture_from_shapes(shapes),
            source.side_config,
            source.side_label,
            given,
            given_label,
        )
        origin = f"architecture checked against {given_label}" if given else "architecture inferred from the weights"
        plan = _plan(canonical, weights.tensors, layout, vae.prefix, config_obj.model, origin, weights.path)
        _emit(notes)
        flat = {}
        bar = tqdm(
            plan,
            desc=f"reading {weights.path.name}",
            unit="tensor",
            disable=None if progress is None else not progress,
        )
        for slot, name in bar:
            flat[slot.path] = keymaps.from_torch(slot.kind, weights.read(name))
    finally:
        source.weights.close()
    return Converted(
        config=config_obj,
        params=param_tree.unflatten_params(flat),
        layout=layout,
        ignored_keys=vae.ignored + weights.non_tensors,
        source_dtypes=sorted({weights.tensors[name].dtype for _, name in plan}),
        source=str(weights.path),
        warnings=notes,
    )


def load_params_export(src: str | os.PathLike, config: ConfigArg = None) -> Converted:
    """A sigmavae_jax params export as a `Converted` (layout "jax"), for the reverse export
    to diffusers / LDM files. A given config must have the export's architecture."""
    params, exported = load_params(src)
    given, given_label = infer.as_config(config)
    notes: list[str] = []
    if given is not None:
        arch = {f: getattr(exported.model, f) for f in infer.ARCHITECTURE_FIELDS}
        exported, notes = infer.resolve_config(arch, None, "", given, given_label)
    flat = param_tree.flatten_params(params)
    return Converted(
        config=exported,
        params=param_tree.unflatten_params({path: np.asarray(value) for path, value in flat.items()}),
        layout="jax",
        ignored_keys=[],
        source_dtypes=sorted({str(np.asarray(v).dtype) for v in flat.values()}),
        source=str(storage.path(src)),
        warnings=notes,
    )


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: ConfigArg = None,
    to: str = "jax",
    dtype: str = "float32",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Converts SRC and writes OUT; returns the summary (see `format_summary`).

    to: "jax" (a params export folder for `sigmavae_jax.load`), "diffusers" (a folder for
    `diffusers.AutoencoderKL.from_pretrained`) or "ldm" (one .safetensors file, LDM keys).
    SRC may also be a params export when `to` is "diffusers" or "ldm" (the reverse export).
    dtype: of the written weights, "float32" or "bfloat16".
    """
    start = time.perf_counter()
    out = storage.reachable(out)
    writers.check_output(out, to)
    writers.check_dtype(dtype)
    if is_params_export(src):
        if to == "jax":
            raise ConversionError(f"{src} is already a sigmavae_jax params export; pick --to diffusers or ldm")
        converted = load_params_export(src, config)
    else:
        converted = load_torch_weights(src, config, progress=progress)
    model = converted.config.model
    params = writers.cast_params(converted.params, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        if to == "jax":
            written = writers.write_jax(
                out,
                params,
                converted.config,
                source=converted.source,
                layout=converted.layout,
                source_dtype=converted.source_dtypes,
                dtype=dtype,
                ignored_keys=len(converted.ignored_keys),
            )
        elif to == "diffusers":
            written = writers.write_diffusers(out, params, model)
        else:
            written = writers.write_ldm(out, params, model)
    write_notes = [str(w.message) for w in caught]
    _emit(write_notes)
    leaves = param_tree.flatten_params(converted.params).values()
    model_dict = to_dict(model)
    return {
        "source": converted.source,
        "layout": converted.layout,
        "ignored_keys": len(converted.ignored_keys),
        "ignored_examples": converted.ignored_keys[:5],
        "tensors": len(leaves),
        "parameters": int(sum(np.size(v) for v in leaves)),
        "source_dtypes": converted.source_dtypes,
        "output_dtype": dtype,
        "config": {f: model_dict[f] for f in infer.ARCHITECTURE_FIELDS + infer.LATENT_FIELDS},
        "output": str(storage.path(written)),
        "format": to,
        "warnings": converted.warnings + write_notes,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


_FORMATS = {
    "jax": "sigmavae_jax params export; sigmavae_jax.load(path)",
    "diffusers": "diffusers folder; diffusers.AutoencoderKL.from_pretrained(path)",
    "ldm": "safetensors file with LDM keys",
}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned lines for a terminal."""
    cfg = summary["config"]
    ignored = str(summary["ignored_keys"])
    if summary["ignored_examples"]:
        more = ", ..." if summary["ignored_keys"] > len(summary["ignored_examples"]) else ""
        ignored += f" ({', '.join(summary['ignored_examples'])}{more})"
    arch = " ".join(f"{f}={cfg[f]}" for f in infer.ARCHITECTURE_FIELDS)
    noise = cfg["noise"]
    latent = (
        f"posterior={cfg['posterior']} latent_norm={cfg['latent_norm']}"
        + (f"(patch {cfg['latent_norm_patch']})" if cfg["latent_norm"] != "none" else "")
        + f" noise={noise['distribution']}({noise['strength']}) "
        + f"scaling_factor={cfg['scaling_factor']} shift_factor={cfg['shift_factor']}"
    )
    rows = [
        ("source", summary["source"]),
        ("layout", summary["layout"]),
        ("ignored keys", ignored),
        ("parameters", f"{summary['parameters']:,} in {summary['tensors']} tensors"),
        ("source dtype", ", ".join(summary["source_dtypes"])),
        ("output dtype", summary["output_dtype"]),
        ("architecture", arch),
        ("latent", latent),
        ("output", f"{summary['output']} ({_FORMATS[summary['format']]})"),
        ("elapsed", f"{summary['elapsed_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["converted:"] + [f"  {name:<{width}}  {value}" for name, value in rows])
