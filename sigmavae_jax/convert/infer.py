"""The model config of a PyTorch VAE.

The architecture comes from the tensor shapes. What the shapes cannot tell -- the GroupNorm
group count and the latent conventions (posterior, latent normalisation, scale/shift) --
comes from, in order: a `--config` given by the user, the source's own config.json (diffusers
or NextStep-1), or the model family's config in configs/ with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import pydantic

from sigmavae_jax.config import Config, ConfigError, ModelConfig, load_config
from sigmavae_jax.convert.errors import ConversionError

# Fields the weights determine; every one is checked against a --config.
WEIGHT_FIELDS = (
    "in_channels",
    "out_channels",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "z_channels",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_attention",
)
ARCHITECTURE_FIELDS = (*WEIGHT_FIELDS, "norm_groups")
LATENT_FIELDS = (
    "posterior",
    "latent_norm",
    "latent_norm_patch",
    "latent_norm_eps",
    "noise",
    "scaling_factor",
    "shift_factor",
)
DEFAULT_NORM_GROUPS = 32  # every published SD / SDXL / FLUX / NextStep-1 VAE
NEXTSTEP_KEYS = ("encoder_norm", "psz", "deterministic")


def _shape(shapes: Mapping[str, tuple[int, ...]], candidates: list[str], ndim: int | None = None):
    for key in candidates:
        shape = shapes.get(key)
        if shape is not None and (ndim is None or len(shape) == ndim):
            return shape
    return None


def _need(shapes, candidates: list[str], what: str, ndim: int = 4) -> tuple[int, ...]:
    shape = _shape(shapes, candidates, ndim)
    if shape is None:
        raise ConversionError(
            f"cannot tell {what} from the weights: none of {candidates} is present with {ndim} "
            "dimensions. Is this an AutoencoderKL (SD/SDXL/FLUX/NextStep-1 VAE)?"
        )
    return shape


def architecture_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The WEIGHT_FIELDS from {LDM key: torch shape}. Raises if a key they need is absent;
    everything else (consistency, missing blocks) is left to the strict key check."""
    ch, in_channels = _need(shapes, ["encoder.conv_in.weight"], "ch and in_channels")[:2]
    out_channels = _need(shapes, ["decoder.conv_out.weight"], "out_channels")[0]
    if (shape := _shape(shapes, ["decoder.conv_in.weight"], 4)) is not None:
        z_channels = shape[1]
    elif (shape := _shape(shapes, ["post_quant_conv.weight"], 4)) is not None:
        z_channels = shape[0]
    else:
        z_channels = _need(shapes, ["encoder.conv_out.weight"], "z_channels")[0] // 2

    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    levels = levels or sorted({int(m[1]) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not levels:
        raise ConversionError("cannot tell ch_mult: the weights have no encoder.down.* or decoder.up.* levels")
    ch_mult = []
    for level in range(levels[-1] + 1):
        width = _need(
            shapes,
            [
                f"encoder.down.{level}.block.0.conv1.weight",
                f"encoder.down.{level}.block.0.conv2.weight",
                f"decoder.up.{level}.block.0.conv2.weight",
            ],
            f"the width of level {level}",
        )[0]
        if width % ch:
            raise ConversionError(
                f"level {level} has {width} channels, not a multiple of ch={ch} (encoder.conv_in); "
                "this model needs widths ch * ch_mult"
            )
        ch_mult.append(width // ch)

    encoder_blocks = {int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.\d+\.block\.(\d+)\.", k))}
    decoder_blocks = {int(m[1]) for k in shapes if (m := re.match(r"decoder\.up\.\d+\.block\.(\d+)\.", k))}
    # The decoder has one block more per level than the encoder.
    num_res_blocks = max(encoder_blocks) + 1 if encoder_blocks else max(decoder_blocks, default=0)
    if num_res_blocks < 1:
        raise ConversionError("cannot tell num_res_blocks: the weights have no ResNet blocks")

    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "ch": ch,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": num_res_blocks,
        "z_channels": z_channels,
        "use_quant_conv": any(k.startswith("quant_conv.") for k in shapes),
        "use_post_quant_conv": any(k.startswith("post_quant_conv.") for k in shapes),
        "mid_attention": any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in shapes),
    }


# ---------------------------------------------------------------------------------------
# The source's own config.json.


def side_config_kind(side: Mapping[str, Any] | None) -> str | None:
    """'sigmavae_jax' (embedded by our writers), 'nextstep', 'diffusers' or None."""
    if side is None:
        return None
    if "sigmavae_jax_model" in side:
        return "sigmavae_jax"
    if any(key in side for key in NEXTSTEP_KEYS):
        return "nextstep"
    if side.get("_class_name") == "AutoencoderKL" or "block_out_channels" in side or "latent_channels" in side:
        return "diffusers"
    return None


def _architecture_from_side(kind: str, side: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields a config.json states (only those it states)."""
    if kind == "sigmavae_jax":
        model = side["sigmavae_jax_model"]
        return {f: model[f] for f in ARCHITECTURE_FIELDS if f in model}
    if kind == "diffusers":
        arch: dict[str, Any] = {}
        widths = side.get("block_out_channels")
        if widths:
            arch["ch"] = widths[0]
            arch["ch_mult"] = tuple(w // widths[0] if w % widths[0] == 0 else w / widths[0] for w in widths)
        renames = {
            "in_channels": "in_channels",
            "out_channels": "out_channels",
            "layers_per_block": "num_res_blocks",
            "latent_channels": "z_channels",
            "norm_num_groups": "norm_groups",
            "use_quant_conv": "use_quant_conv",
            "use_post_quant_conv": "use_post_quant_conv",
            "mid_block_add_attention": "mid_attention",
        }
    else:
        arch = {"ch_mult": tuple(side["ch_mult"])} if "ch_mult" in side else {}
        renames = {
            "in_channels": "in_channels",
            "out_ch": "out_channels",
            "ch": "ch",
            "num_res_blocks": "num_res_blocks",
            "z_channels": "z_channels",
        }
    arch.update({ours: side[theirs] for theirs, ours in renames.items() if side.get(theirs) is not None})
    return arch


def _latent_from_side(kind: str, side: Mapping[str, Any]) -> dict[str, Any]:
    """The latent conventions a config.json states; no scaling_factor if it states none."""
    if kind == "sigmavae_jax":
        model = side["sigmavae_jax_model"]
        return {f: model[f] for f in LATENT_FIELDS if f in model}
    if kind == "nextstep":
        # NextStep-1: LayerNorm over each psz x psz patch of the mean (psz None: per position).
        latent: dict[str, Any] = {
            "posterior": "deterministic" if side.get("deterministic") else "gaussian",
            "latent_norm": "patch_layernorm" if side.get("encoder_norm") else "none",
            "latent_norm_patch": side.get("psz") or 1,
        }
    else:
        latent = {"posterior": "gaussian", "latent_norm": "none"}
    if side.get("scaling_factor") is not None:
        latent["scaling_factor"] = side["scaling_factor"]
        latent["shift_factor"] = side.get("shift_factor") or 0.0  # diffusers writes null for 0
    return latent


# ---------------------------------------------------------------------------------------
# Putting it together.


def as_config(config: str | os.PathLike | Config | ModelConfig | None) -> tuple[Config | None, str]:
    """A user's `config` argument -> (Config or None, a label for messages)."""
    if config is None:
        return None, ""
    if isinstance(config, Config):
        return config, "the given config"
    if isinstance(config, ModelConfig):
        return Config(model=config), "the given config"
    if isinstance(config, (str, os.PathLike)):
        try:
            return load_config(config), f"--config {config}"
        except ConfigError as error:
            raise ConversionError(str(error)) from None
    raise ConversionError(
        f"config must be a config name, a YAML path, a Config or a ModelConfig; got {type(config).__name__}"
    )


def _family_latent(arch: Mapping[str, Any], groups_known: bool) -> tuple[dict[str, Any], str]:
    """Scale/shift of the model family the architecture belongs to, and the warning to show."""
    if arch["z_channels"] == 16 and not arch["use_quant_conv"]:
        family, name = "FLUX", "flux"
    elif arch["z_channels"] == 4 and arch["use_quant_conv"]:
        family, name = "SD 1.x/2.x", "sd"
    else:
        family, name = "", None
    if name is None:
        latent = {"scaling_factor": 1.0, "shift_factor": 0.0}
        assumed = "no known model family has this architecture; using scaling_factor 1.0, shift_factor 0.0"
    else:
        model = load_config(name).model
        latent = {"scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor}
        assumed = (
            f"assuming {family} (configs/{name}.yaml): scaling_factor {model.scaling_factor}, "
            f"shift_factor {model.shift_factor}"
        )
    warning = (
        f"the latent scaling factor cannot be read from the weights; {assumed}. "
        "SDXL needs --config sdxl, NextStep-1 needs --config nextstep1_f8c16 (or give the "
        "folder with its config.json)."
    )
    if not groups_known:
        warning += f" GroupNorm groups cannot be read either; assuming {DEFAULT_NORM_GROUPS}."
    return latent, warning


def _mismatch_table(rows: list[tuple[str, Any, Any]], left: str, right: str) -> list[str]:
    width = max(len(r[0]) for r in [*rows, ("field", 0, 0)])
    lines = [f"  {'field':<{width}}  {left:<12}  {right}"]
    return lines + [f"  {f:<{width}}  {a!s:<12}  {b}" for f, a, b in rows]


def _compare(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    fields = [f for f in ARCHITECTURE_FIELDS if f in ours and f in theirs]
    return [(f, ours[f], theirs[f]) for f in fields if _as_tuple(ours[f]) != _as_tuple(theirs[f])]


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def resolve_config(
    weights_arch: Mapping[str, Any],
    side: Mapping[str, Any] | None,
    side_label: str,
    given: Config | None,
    given_label: str = "",
) -> tuple[Config, list[str]]:
    """The Config to convert with, and warnings for the user.

    Raises ConversionError when config.json or `given` disagrees with the weights.
    """
    warnings: list[str] = []
    kind = side_config_kind(side)
    if side is not None and kind is None:
        warnings.append(f"{side_label} is neither a diffusers nor a NextStep-1 config; ignored")
    side_arch = _architecture_from_side(kind, side) if kind else {}
    side_latent = _latent_from_side(kind, side) if kind else {}

    if rows := _compare(side_arch, weights_arch):
        raise ConversionError(
            "\n".join(
                [
                    f"{side_label} disagrees with the weights it came with:",
                    *_mismatch_table(rows, "stated", "weights"),
                    "The source is inconsistent; fix its config or use the matching weights.",
                ]
            )
        )
    known = dict(weights_arch)
    if "norm_groups" in side_arch:
        known["norm_groups"] = side_arch["norm_groups"]

    if given is not None:
        if rows := _compare(given.model.model_dump(), known):
            raise ConversionError(
                "\n".join(
                    [
                        f"the weights do not fit {given_label}:",
                        *_mismatch_table(rows, "config", "weights"),
                        "Give a config with this architecture, or leave --config out to infer "
                        "the architecture from the weights.",
                    ]
                )
            )
        stated = side_latent.get("scaling_factor")
        if stated is not None and stated != given.model.scaling_factor:
            warnings.append(
                f"{side_label} states scaling_factor {stated}; using {given.model.scaling_factor} from {given_label}"
            )
        return given, warnings

    latent = dict(side_latent)
    if "scaling_factor" not in latent:
        family_latent, warning = _family_latent(weights_arch, "norm_groups" in known)
        latent.update(family_latent)
        warnings.append(warning)
    if kind == "diffusers" and (side.get("latents_mean") or side.get("latents_std")):
        warnings.append(f"{side_label} has latents_mean/latents_std, which this model does not use; ignored")
    try:
        model = ModelConfig(**{"norm_groups": DEFAULT_NORM_GROUPS, **known, **latent})
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConversionError(
            f"the architecture read from the weights is not a valid model config ({problems}); "
            "give --config with a YAML that sets it (e.g. model.norm_groups)"
        ) from None
    return Config(model=model), warnings
