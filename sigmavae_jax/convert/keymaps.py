"""Names and layouts: our parameter paths <-> LDM keys <-> diffusers keys, and the
transposes between the JAX and torch array layouts.

Our parameter paths mirror the LDM/CompVis keys (`encoder/down/0/block/1/conv2/kernel` is
`encoder.down.0.block.1.conv2.weight`), so the LDM name of every parameter follows from the
model itself (`param_tree.expected_params`) rather than from a hand-written list. Diffusers names are
a rewrite of LDM names; the one trap is the decoder, whose `up_blocks.i` is LDM `up.(n-1-i)`.

Array layouts (C = channels, k = kernel size):
    conv kernel          ours (k, k, C_in, C_out)   torch (C_out, C_in, k, k)
    attention q/k/v/out  ours (C_in, C_out)         LDM (C_out, C_in, 1, 1), diffusers (C_out, C_in)
    bias, GroupNorm      the same (C,) everywhere; our GroupNorm `scale` is torch's `weight`
All conversions are transposes and reshapes, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from sigmavae_jax.config import ModelConfig
from sigmavae_jax.convert.errors import ConversionError
from sigmavae_jax.models import params as param_tree

LAYOUTS = ("ldm", "diffusers")
VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
# Prefixes that wrap the VAE's keys: a full SD checkpoint (`first_stage_model.`), pipelines
# that save their parts under `vae.`, and training wrappers (`model.`, DDP's `module.`).
WRAPPER_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")


class Kind(enum.Enum):
    CONV = "conv"  # ours (k, k, C_in, C_out); torch (C_out, C_in, k, k)
    LINEAR = "linear"  # ours (C_in, C_out); LDM 1x1 conv (C_out, C_in, 1, 1); diffusers (C_out, C_in)
    VECTOR = "vector"  # biases and GroupNorm scales: (C,) in every layout


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    """One parameter of the model: where it lives here and what it is called in LDM files."""

    path: tuple  # ('encoder', 'down', 0, 'block', 1, 'conv2', 'kernel')
    ldm_key: str  # 'encoder.down.0.block.1.conv2.weight'
    kind: Kind
    shape: tuple[int, ...]  # our layout


def ldm_key_of(path: tuple) -> str:
    """('decoder', 'up', 0, 'block', 1, 'norm1', 'scale') -> 'decoder.up.0.block.1.norm1.weight'."""
    *parents, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(str(part) for part in (*parents, leaf))


def _kind_of(path: tuple, shape: tuple[int, ...]) -> Kind:
    if path[-1] != "kernel":
        return Kind.VECTOR
    return Kind.CONV if len(shape) == 4 else Kind.LINEAR


@functools.lru_cache(maxsize=8)
def param_slots(cfg: ModelConfig) -> tuple[ParamSlot, ...]:
    """Every parameter of the model for `cfg`, derived from the model itself."""
    slots = []
    for path, spec in param_tree.expected_params(cfg).items():
        shape = tuple(spec.shape)
        slots.append(ParamSlot(path, ldm_key_of(path), _kind_of(path, shape), shape))
    return tuple(slots)


# ---------------------------------------------------------------------------------------
# Array layouts.


def torch_shape(kind: Kind, shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Our shape -> the shape the tensor has in a torch file of `layout`."""
    if kind is Kind.CONV:
        kh, kw, c_in, c_out = shape
        return (c_out, c_in, kh, kw)
    if kind is Kind.LINEAR:
        c_in, c_out = shape
        return (c_out, c_in, 1, 1) if layout == "ldm" else (c_out, c_in)
    return tuple(shape)


def accepts_torch_shape(kind: Kind, shape: tuple[int, ...], source_shape: tuple[int, ...]) -> bool:
    """Whether a source tensor of `source_shape` can fill our parameter of `shape`.

    Attention matrices are accepted as (C_out, C_in) with or without trailing unit dims in
    either layout: LDM stores 1x1 convs, diffusers Linear layers, some re-exports mix them,
    and old diffusers `proj_attn` conv1d weights are (C_out, C_in, 1). All are one matrix.
    """
    if kind is Kind.LINEAR:
        c_in, c_out = shape
        return source_shape[:2] == (c_out, c_in) and all(d == 1 for d in source_shape[2:])
    return tuple(source_shape) == torch_shape(kind, shape, "ldm")


def from_torch(kind: Kind, value: np.ndarray) -> np.ndarray:
    """A torch-layout array -> our layout (a contiguous copy)."""
    if kind is Kind.CONV:
        value = value.transpose(2, 3, 1, 0)
    elif kind is Kind.LINEAR:
        value = value.reshape(value.shape[:2]).T
    return np.ascontiguousarray(value)


def to_torch(kind: Kind, value: np.ndarray, layout: str) -> np.ndarray:
    """Our layout -> the torch layout of `layout` (a contiguous copy)."""
    if kind is Kind.CONV:
        value = value.transpose(3, 2, 0, 1)
    elif kind is Kind.LINEAR:
        value = value.T if layout == "diffusers" else value.T[:, :, None, None]
    return np.ascontiguousarray(value)


# ---------------------------------------------------------------------------------------
# Names: LDM <-> diffusers.

_RESNET_LDM_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}
_RESNET_DIFFUSERS_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_ATTN_LDM_TO_DIFFUSERS = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
# diffusers renamed its attention layers; older files use query/key/value/proj_attn.
_ATTN_DIFFUSERS_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


def _rename_layer(rest: str, table: Mapping[str, str] | None) -> str | None:
    """'conv_shortcut.weight' -> 'nin_shortcut.weight': renames the layer before the leaf by
    `table`. None when `rest` is a nested name the table does not know (no translation)."""
    if table is None:
        return rest
    layer, _, leaf = rest.rpartition(".")
    if layer in table:
        return f"{table[layer]}.{leaf}"
    return rest if "." not in layer else None


def _up_level(index: str, n_levels: int) -> int | None:
    """diffusers decoder `up_blocks.i` <-> LDM `up.(n-1-i)` (the map is its own inverse)."""
    level = n_levels - 1 - int(index)
    return level if level >= 0 else None


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Rewrites keys matching `pattern` (full match; its last group is the layer + leaf):
    `head(match, n_levels)` gives the new prefix (None: no translation), `layers` renames
    the layer."""

    pattern: str
    head: Callable[[re.Match, int], str | None]
    layers: Mapping[str, str] | None = None


def _apply_rules(rules: tuple[_Rule, ...], key: str, n_levels: int) -> str:
    for rule in rules:
        if match := re.fullmatch(rule.pattern, key):
            head = rule.head(match, n_levels)
            tail = _rename_layer(match[match.re.groups], rule.layers)
            return key if head is None or tail is None else head + tail
    return key


def _up(template: str) -> Callable[[re.Match, int], str | None]:
    def head(m: re.Match, n: int) -> str | None:
        level = _up_level(m[1], n)
        return None if level is None else template.format(level=level, m=m)

    return head


_LDM_TO_DIFFUSERS_RULES = (
    _Rule(
        r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
        lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.",
        _RESNET_LDM_TO_DIFFUSERS,
    ),
    _Rule(
        r"encoder\.down\.(\d+)\.downsample\.(.+)",
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.",
    ),
    _Rule(
        r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
        _up("decoder.up_blocks.{level}.resnets.{m[2]}."),
        _RESNET_LDM_TO_DIFFUSERS,
    ),
    _Rule(r"decoder\.up\.(\d+)\.upsample\.(.+)", _up("decoder.up_blocks.{level}.upsamplers.0.")),
    _Rule(
        r"(encoder|decoder)\.mid\.block_(\d+)\.(.+)",
        lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
    ),
    _Rule(
        r"(encoder|decoder)\.mid\.attn_1\.(.+)",
        lambda m, n: f"{m[1]}.mid_block.attentions.0.",
        _ATTN_LDM_TO_DIFFUSERS,
    ),
    _Rule(r"(encoder|decoder)\.norm_out\.(.+)", lambda m, n: f"{m[1]}.conv_norm_out."),
)

_DIFFUSERS_TO_LDM_RULES = (
    _Rule(
        r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
        lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.",
        _RESNET_DIFFUSERS_TO_LDM,
    ),
    _Rule(
        r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)",
        lambda m, n: f"encoder.down.{m[1]}.downsample.",
    ),
    _Rule(
        r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
        _up("decoder.up.{level}.block.{m[2]}."),
        _RESNET_DIFFUSERS_TO_LDM,
    ),
    _Rule(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", _up("decoder.up.{level}.upsample.")),
    _Rule(
        r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
        lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.",
    ),
    _Rule(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
        lambda m, n: f"{m[1]}.mid.attn_1.",
        _ATTN_DIFFUSERS_TO_LDM,
    ),
    _Rule(r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m, n: f"{m[1]}.norm_out."),
)


def ldm_to_diffusers(key: str, n_levels: int) -> str:
    """The diffusers name of an LDM key; `n_levels` = len(ch_mult) (decoder blocks reverse)."""
    return _apply_rules(_LDM_TO_DIFFUSERS_RULES, key, n_levels)


def diffusers_to_ldm(key: str, n_levels: int) -> str:
    """The LDM name of a diffusers key (old attention names too). Keys no rule knows come
    back unchanged, so they surface as unexpected under their own name."""
    return _apply_rules(_DIFFUSERS_TO_LDM_RULES, key, n_levels)


def source_name(ldm_key: str, layout: str, n_levels: int, prefix: str = "") -> str:
    """What the tensor for `ldm_key` is (or would be) called in a source file of `layout`."""
    name = ldm_to_diffusers(ldm_key, n_levels) if layout == "diffusers" else ldm_key
    return prefix + name


# ---------------------------------------------------------------------------------------
# Finding the VAE inside a state dict.


@dataclasses.dataclass(frozen=True)
class VaeKeys:
    """The VAE tensors of a state dict, with the wrapper prefix removed."""

    names: dict[str, str]  # name without prefix -> name in the file
    prefix: str  # e.g. "first_stage_model." or ""
    ignored: list[str]  # everything else (loss.*, model.diffusion_model.*, ...), file names


def _split_prefix(name: str) -> tuple[str, str] | None:
    """'first_stage_model.encoder.conv_in.weight' -> ('first_stage_model.', 'encoder.conv_in.weight');
    None if the name is not a VAE key under wrapper prefixes."""
    prefix, rest = "", name
    while True:
        if rest.split(".", 1)[0] in VAE_ROOTS and "." in rest:
            return prefix, rest
        wrapper = next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None)
        if wrapper is None:
            return None
        prefix, rest = prefix + wrapper, rest[len(wrapper) :]


def select_vae_keys(names: Iterable[str]) -> VaeKeys:
    """Picks out the VAE's tensors. Raises if there are none, or if VAE keys appear under
    several prefixes (two models in one file: which one is meant is not guessable)."""
    names = list(names)
    by_prefix: dict[str, dict[str, str]] = {}
    ignored = []
    for name in names:
        split = _split_prefix(name)
        if split is None:
            ignored.append(name)
        else:
            by_prefix.setdefault(split[0], {})[split[1]] = name
    if not by_prefix:
        heads: dict[str, int] = {}
        for name in names:
            heads[name.split(".", 1)[0]] = heads.get(name.split(".", 1)[0], 0) + 1
        common = ", ".join(f"{h}.* ({n})" for h, n in sorted(heads.items(), key=lambda x: -x[1])[:8])
        raise ConversionError(
            "no VAE tensors found: expected names starting with "
            f"{', '.join(r + '.' for r in VAE_ROOTS)} (possibly after "
            f"{', '.join(WRAPPER_PREFIXES)}); the file has {len(names)} tensors: {common or 'none'}"
        )
    if len(by_prefix) > 1:
        examples = "; ".join(
            f"{prefix or '(no prefix)'}: {len(keys)} keys, e.g. {next(iter(keys.values()))}"
            for prefix, keys in by_prefix.items()
        )
        raise ConversionError(
            f"VAE tensors appear under several prefixes ({examples}); save the one VAE you want to convert on its own"
        )
    prefix, vae = next(iter(by_prefix.items()))
    return VaeKeys(names=vae, prefix=prefix, ignored=ignored)


_DIFFUSERS_PARTS = {"down_blocks", "up_blocks", "mid_block", "conv_norm_out"}
_LDM_PARTS = {"down", "up", "mid", "norm_out"}


def detect_layout(keys: Iterable[str]) -> str:
    """'ldm' or 'diffusers', from the second component of encoder/decoder keys."""
    seen: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] in ("encoder", "decoder") and len(parts) > 2:
            seen.setdefault(parts[1], key)
    diffusers = [seen[p] for p in sorted(_DIFFUSERS_PARTS & seen.keys())]
    ldm = [seen[p] for p in sorted(_LDM_PARTS & seen.keys())]
    if diffusers and ldm:
        raise ConversionError(
            f"the file mixes diffusers names (e.g. {diffusers[0]}) and LDM names (e.g. {ldm[0]}); "
            "it must use one layout"
        )
    return "diffusers" if diffusers else "ldm"


def count_levels(keys: Iterable[str], layout: str) -> int:
    """The number of resolution levels (len(ch_mult)) named in the keys; 0 if none."""
    pattern = (
        r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\."
        if layout == "diffusers"
        else r"(?:encoder\.down|decoder\.up)\.(\d+)\."
    )
    levels = [int(m[1]) for key in keys if (m := re.match(pattern, key))]
    return max(levels) + 1 if levels else 0


def canonical_names(vae: VaeKeys, layout: str, n_levels: int) -> dict[str, str]:
    """LDM key -> name in the file, for every VAE tensor. Raises if two tensors claim one
    parameter (e.g. both `to_q` and the old `query`), since each must be used exactly once."""
    canonical: dict[str, str] = {}
    clashes = []
    for stripped, original in vae.names.items():
        name = diffusers_to_ldm(stripped, n_levels) if layout == "diffusers" else stripped
        if name in canonical:
            clashes.append(f"{canonical[name]} and {original} are both {name}")
        canonical[name] = original
    if clashes:
        raise ConversionError("\n".join(["several tensors map to one parameter:"] + [f"  {c}" for c in clashes[:20]]))
    return canonical


# ---------------------------------------------------------------------------------------
# Our params -> torch state dicts.


def _flat_checked(params: Mapping[Any, Any], model_cfg: ModelConfig) -> dict[tuple, Any]:
    try:
        param_tree.check_params(dict(params), model_cfg)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    return param_tree.flatten_params(dict(params))


def to_ldm_state_dict(params: Mapping[Any, Any], model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our nested params -> {LDM key: numpy array in torch layout}, dtype as given."""
    flat = _flat_checked(params, model_cfg)
    return {slot.ldm_key: to_torch(slot.kind, np.asarray(flat[slot.path]), "ldm") for slot in param_slots(model_cfg)}


def to_diffusers_state_dict(params: Mapping[Any, Any], model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our nested params -> {diffusers key: numpy array in torch layout}, dtype as given."""
    flat = _flat_checked(params, model_cfg)
    n_levels = len(model_cfg.ch_mult)
    return {
        ldm_to_diffusers(slot.ldm_key, n_levels): to_torch(slot.kind, np.asarray(flat[slot.path]), "diffusers")
        for slot in param_slots(model_cfg)
    }
