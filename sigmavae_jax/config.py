"""Typed configuration: YAML files in configs/ plus dotted `key.sub=value` overrides.

Validation is pydantic's: unknown keys and bad values raise a `ConfigError` that names
the dotted key, the value received and what is allowed.
"""

from __future__ import annotations

import pathlib
from typing import Any, Literal

import pydantic
import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that does not validate."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SigmaNoiseConfig(_Strict):
    """Sigma-VAE noise z = mu + sigma * eps, sigma drawn once per sample (training only).

    `uniform`: sigma ~ U(0, strength) (NextStep-1). `normal`: sigma ~ N(0, strength^2)
    (LatentLM). `none`: no noise.
    """

    distribution: Literal["none", "uniform", "normal"] = "none"
    strength: float = pydantic.Field(0.0, ge=0.0)


class ModelConfig(_Strict):
    """AutoencoderKL architecture, posterior and latent conventions (DESIGN section 3)."""

    in_channels: int = pydantic.Field(3, gt=0)
    out_channels: int = pydantic.Field(3, gt=0)
    ch: int = pydantic.Field(128, gt=0)
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = pydantic.Field(2, gt=0)
    z_channels: int = pydantic.Field(4, gt=0)
    norm_groups: int = pydantic.Field(32, gt=0)
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    posterior: Literal["gaussian", "deterministic"] = "gaussian"
    latent_norm: Literal["none", "patch_layernorm"] = "none"
    latent_norm_patch: int = pydantic.Field(2, gt=0)
    latent_norm_eps: float = pydantic.Field(1e-6, gt=0.0)
    sample_posterior: bool = True
    noise: SigmaNoiseConfig = SigmaNoiseConfig()
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @pydantic.field_validator("ch_mult")
    @classmethod
    def _positive_mults(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(m <= 0 for m in value):
            raise ValueError(f"must be a non-empty list of positive ints, got {list(value)}")
        return value

    @pydantic.field_validator("scaling_factor")
    @classmethod
    def _nonzero_scale(cls, value: float) -> float:
        if value == 0.0:
            raise ValueError("must be non-zero (latents are divided by it in unscale)")
        return value

    @pydantic.model_validator(mode="after")
    def _groups_divide_channels(self) -> "ModelConfig":
        for width in sorted({self.ch * m for m in self.ch_mult}):
            if width % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every block width "
                    f"(ch * ch_mult = {width}); pick ch or norm_groups so it does"
                )
        return self

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (8 for the SD/FLUX family)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def spatial_multiple(self) -> int:
        """Heights and widths must be multiples of this (patch LayerNorm needs whole patches)."""
        patch = self.latent_norm_patch if self.latent_norm == "patch_layernorm" else 1
        return self.downsample_factor * patch


class Config(_Strict):
    """The root of the config tree. Later sections (train, data, eval) hang off it."""

    model: ModelConfig = ModelConfig()


def _format_errors(error: pydantic.ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {item['input']!r}); check the spelling")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item['input']!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turns ["model.z_channels=16", "model.ch_mult=[1,2]"] into a nested dict.

    Values are parsed as YAML, so numbers, booleans and lists get their types.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """`nextstep1_f8c16`, `configs/flux.yaml` or any YAML path -> an existing file."""
    path = pathlib.Path(name_or_path)
    candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found; give a YAML path or one of {known}")


def from_dict(tree: dict[str, Any], source: str = "dict") -> Config:
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(name_or_path: str | pathlib.Path | None = None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config (or the defaults) and applies `key.sub=value` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
        source = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(list(overrides)))
        source += " + overrides"
    return from_dict(tree, source)


def to_dict(config: pydantic.BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return config.model_dump(mode="json")
