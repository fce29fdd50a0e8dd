"""Encoder, Decoder and AutoencoderKL (LDM layout, NHWC, Flax NNX).

Parameter paths mirror the LDM checkpoint keys: `encoder/down/0/block/1/conv2/kernel` is
`encoder.down.0.block.1.conv2.weight`; `decoder/up/0` is the full-resolution level.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sigmavae_jax.config import ModelConfig
from sigmavae_jax.kernels import XLA, Kernels
from sigmavae_jax.models import latent
from sigmavae_jax.models.layers import (
    AttnBlock,
    Downsample,
    GroupNorm,
    ResnetBlock,
    Upsample,
    conv,
)
from sigmavae_jax.models.recompute import recomputed

Remat = bool | str  # False | True | "convs" | "blocks" | "nested" (see config.TrainConfig.remat)
# What a recomputed unit saves for its backward pass, besides its input.
REMAT_POLICIES = {
    True: jax.checkpoint_policies.nothing_saveable,
    "convs": jax.checkpoint_policies.dots_saveable,
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "nested": jax.checkpoint_policies.nothing_saveable,
}
BLOCK_KINDS = ("block", "mid")

# A step of a forward pass: (fn, module, kind); fn(module, x) -> x. kind says where a recomputed
# unit may end: "block" (a level's ResnetBlock), "mid" (a block or attention at the latent
# resolution), "lead" (a step whose output is bigger than its input, an Upsample or conv_in: it
# joins the block after it), "tail" (a step whose output is no bigger, a Downsample or the output
# head: it joins the block before it).
Step = tuple[Callable[[Any, jax.Array], jax.Array], nnx.Module, str]


def _scope(module: nnx.Module) -> str:
    """The name of `module`'s operations in the compiled program (their op_name metadata, which
    profiles and `--dump-top` show): its parameter path (`name_scopes`), else its class."""
    return getattr(module, "scope_name", type(module).__name__)


def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    with jax.named_scope(_scope(module)):
        return module(x)


def _norm_silu(norm: nnx.Module, x: jax.Array) -> jax.Array:
    with jax.named_scope(_scope(norm)):
        return nnx.silu(norm(x))


def name_scopes(model: nnx.Module) -> None:
    """Names every module under `model` after its parameter path (`encoder/down/0/block/1`),
    for `_call`'s named scopes; the parameters and the maths are unchanged."""
    named = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and path]
    for path, node in named:
        node.scope_name = "/".join(str(part) for part in path)


def check_remat(remat: Remat) -> None:
    if remat and remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} unknown; use False, True, 'convs', 'blocks' or 'nested'")


def memory_kernels(kernels: Kernels, remat: Remat) -> Kernels:
    """The kernels of a model recomputed with `remat`: under a memory setting its ResnetBlocks take
    autodiff's backward pass, which holds one activation fewer at each block's peak than
    `kernels.written_block_backward`'s (a memory setting is for the largest batch; the written
    backward is for fewer bytes). `kernels` itself without one."""
    return dataclasses.replace(kernels, written_block_backward=False) if remat else kernels


def remat_units(steps: list[Step]) -> list[list[Step]]:
    """`steps` in recomputed units: each unit holds one block with the "lead" steps just before
    it and the "tail" steps just after it, so that the backward pass keeps each unit's input,
    the smaller side of every resampler, and recomputes the rest."""
    units: list[list[Step]] = []
    for step in steps:
        kind = step[2]
        if not units or (kind != "tail" and any(other[2] in BLOCK_KINDS for other in units[-1])):
            units.append([])
        units[-1].append(step)
    return units


def _run_unit(fns: tuple[Callable, ...], modules: tuple[nnx.Module, ...], x: jax.Array) -> jax.Array:
    for fn, module in zip(fns, modules):
        x = fn(module, x)
    return x


def remat_plan(steps: list[Step], remat: Remat) -> list[tuple[bool, list[Step]]]:
    """`steps` as consecutive runs, each with whether the backward pass recomputes it: with
    False none is; with "blocks" each level's ResnetBlock alone is (the resamplers, conv_in,
    the heads and the blocks at the latent resolution keep their activations: they cost the
    most FLOPs per byte kept); otherwise every run is a `remat_units` unit."""
    if not remat:
        return [(False, steps)]
    if remat == "blocks":
        return [(step[2] == "block", [step]) for step in steps]
    return [(True, unit) for unit in remat_units(steps)]


def split_at_final_resolution(steps: list[Step]) -> tuple[list[Step], list[Step]]:
    """`steps` as (the units whose output is below or above the last resolution, the units
    whose output is at it), cut between `remat_units` units after the last resampler's
    change of resolution: before the unit an `Upsample` leads, after the one a `Downsample`
    trails. ([], steps) when no step resamples."""
    units = remat_units(steps)
    cut = 0
    for index, unit in enumerate(units):
        for _, module, _ in unit:
            if isinstance(module, Upsample):
                cut = index
            elif isinstance(module, Downsample):
                cut = index + 1
    return [step for unit in units[:cut] for step in unit], [step for unit in units[cut:] for step in unit]


def _run_units(fns_and_kinds: tuple[tuple[Callable, str], ...], modules: tuple[nnx.Module, ...], x: jax.Array):
    steps = [(fn, module, kind) for (fn, kind), module in zip(fns_and_kinds, modules)]
    return run_steps(steps, x, True)


def run_steps(steps: list[Step], x: jax.Array, remat: Remat = False) -> jax.Array:
    """The steps in order; the runs `remat_plan` marks are recomputed in the backward pass
    (keeping, besides each run's input, what REMAT_POLICIES[remat] saves).

    remat="nested" recomputes the units as True does and, around them, the units before the
    last resolution (`split_at_final_resolution`) as one run, so that while the units at the
    last resolution go backwards only that run's input is kept of it; its units' forward pass
    is then computed three times."""
    if remat == "nested":
        before, final = split_at_final_resolution(steps)
        if before:
            fn = functools.partial(_run_units, tuple((s[0], s[2]) for s in before))
            x = recomputed(fn, tuple(s[1] for s in before), x, policy=REMAT_POLICIES[remat])
        return run_steps(final, x, True)
    for recompute, run in remat_plan(steps, remat):
        fn, modules = functools.partial(_run_unit, tuple(s[0] for s in run)), tuple(s[1] for s in run)
        x = recomputed(fn, modules, x, policy=REMAT_POLICIES[remat]) if recompute else fn(modules, x)
    return x


class MidBlock(nnx.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, *, attention: bool, groups: int, dtype, kernels: Kernels, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs)
        self.attn_1 = AttnBlock(channels, groups=groups, dtype=dtype, rngs=rngs) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs)

    def steps(self) -> list[Step]:
        """Its blocks as steps of a forward pass (see `run_steps`)."""
        return [(_call, m, "mid") for m in (self.block_1, self.attn_1, self.block_2) if m is not None]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_steps(self.steps(), x)


class Level(nnx.Module):
    """One resolution: `block` (a list of ResnetBlocks), then an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], downsample=None, upsample=None):
        self.block = nnx.List(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def steps(self) -> list[Step]:
        """Its blocks and resampler as steps of a forward pass (see `run_steps`)."""
        steps: list[Step] = [(_call, block, "block") for block in self.block]
        if self.downsample is not None:
            steps.append((_call, self.downsample, "tail"))
        if self.upsample is not None:
            steps.append((_call, self.upsample, "lead"))
        return steps

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_steps(self.steps(), x)


class Encoder(nnx.Module):
    """(B, H, W, in_channels) in [-1, 1] -> moments (B, H/f, W/f, 2z)."""

    def __init__(self, cfg: ModelConfig, *, dtype, kernels: Kernels, rngs: nnx.Rngs, remat: Remat = False):
        check_remat(remat)
        self.remat = remat
        kernels = memory_kernels(kernels, remat)
        groups = cfg.norm_groups
        self.conv_in = conv(cfg.in_channels, cfg.ch, 3, dtype=dtype, kernels=kernels, rngs=rngs)
        levels = []
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs))
                block_in = block_out
            last = i == len(cfg.ch_mult) - 1
            down = None if last else Downsample(block_in, dtype=dtype, kernels=kernels, rngs=rngs)
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        self.mid = MidBlock(
            block_in, attention=cfg.mid_attention, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs
        )
        self.norm_out = GroupNorm(block_in, num_groups=groups, model_dtype=dtype, rngs=rngs)
        self.conv_out = conv(block_in, 2 * cfg.z_channels, 3, dtype=dtype, kernels=kernels, rngs=rngs)

    def downsample_steps(self) -> list[Step]:
        """conv_in and the levels as steps of a forward pass (see `run_steps`)."""
        return [(_call, self.conv_in, "lead")] + [step for level in self.down for step in level.steps()]

    def downsample_features(self, x: jax.Array) -> jax.Array:
        """conv_in and the levels: the local part, (B, H/f, W/f, ch * ch_mult[-1])."""
        return run_steps(self.downsample_steps(), x, self.remat)

    def moments_from_features(self, h: jax.Array) -> jax.Array:
        """The mid block (global attention) and the output head."""
        head = [(_norm_silu, self.norm_out, "tail"), (_call, self.conv_out, "tail")]
        return run_steps(self.mid.steps() + head, h, self.remat)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.moments_from_features(self.downsample_features(x))


class Decoder(nnx.Module):
    """(B, h, w, z) latent -> (B, h*f, w*f, out_channels) image (no tanh)."""

    def __init__(self, cfg: ModelConfig, *, dtype, kernels: Kernels, rngs: nnx.Rngs, remat: Remat = False):
        check_remat(remat)
        self.remat = remat
        kernels = memory_kernels(kernels, remat)
        groups = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv(cfg.z_channels, block_in, 3, dtype=dtype, kernels=kernels, rngs=rngs)
        self.mid = MidBlock(
            block_in, attention=cfg.mid_attention, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs
        )
        levels = {}
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups=groups, dtype=dtype, kernels=kernels, rngs=rngs))
                block_in = block_out
            up = Upsample(block_in, dtype=dtype, kernels=kernels, rngs=rngs) if i != 0 else None
            levels[i] = Level(blocks, upsample=up)
        # up[0] is the full-resolution level, as in LDM checkpoints; it runs last.
        self.up = nnx.List([levels[i] for i in range(len(cfg.ch_mult))])
        self.norm_out = GroupNorm(block_in, num_groups=groups, model_dtype=dtype, rngs=rngs)
        self.conv_out = conv(block_in, cfg.out_channels, 3, dtype=dtype, kernels=kernels, rngs=rngs)

    def bottleneck(self, z: jax.Array) -> jax.Array:
        """conv_in and the mid block (global attention), at the latent resolution."""
        return run_steps([(_call, self.conv_in, "lead"), *self.mid.steps()], z, self.remat)

    def upsample_steps(self) -> list[Step]:
        """The levels, lowest resolution first, and the output norm as steps of a forward pass
        (see `run_steps`)."""
        return [step for level in reversed(self.up) for step in level.steps()] + [(_norm_silu, self.norm_out, "tail")]

    def upsample_features(self, h: jax.Array) -> jax.Array:
        """The levels and the norm: the local part, up to conv_out's input."""
        return run_steps(self.upsample_steps(), h, self.remat)


def check_image_shape(cfg: ModelConfig, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `shape` is (B, H, W, in_channels) with H, W multiples of
    the model's spatial factor."""
    if len(shape) != 4:
        raise ValueError(f"images must be NHWC (batch, height, width, channels); got shape {shape}")
    if shape[-1] != cfg.in_channels:
        hint = " (this looks like NCHW: transpose with x.transpose(0, 2, 3, 1))" if shape[1] == cfg.in_channels else ""
        raise ValueError(f"images must have {cfg.in_channels} channels last; got shape {shape}{hint}")
    m = cfg.spatial_multiple
    if shape[1] % m or shape[2] % m:
        raise ValueError(
            f"image height and width must be multiples of {m} for this model; got "
            f"{shape[1]}x{shape[2]}. Pad or crop to e.g. "
            f"{-(-shape[1] // m) * m}x{-(-shape[2] // m) * m}"
        )


def check_latent_shape(cfg: ModelConfig, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `shape` is (B, h, w, z_channels)."""
    if len(shape) != 4 or shape[-1] != cfg.z_channels:
        raise ValueError(f"latents must be NHWC with {cfg.z_channels} channels; got shape {shape}")


class AutoencoderKL(nnx.Module):
    """The LDM KL autoencoder with the posterior, latent norm and Sigma-VAE noise of `cfg`.

    Images are NHWC floats in [-1, 1]; latents are NHWC and unscaled (see `scale`).
    `dtype` is the compute dtype (parameters stay float32); `remat` (True, "convs" to keep the
    conv outputs, "blocks" or "nested") recomputes activations in the backward pass
    (`run_steps`) to save memory at high resolution; `kernels` computes
    the convolutions (`sigmavae_jax.kernels`; the same parameters and maths either way).
    """

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: Remat = False, kernels: Kernels = XLA
    ):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.kernels = kernels
        self.encoder = Encoder(cfg, dtype=dtype, kernels=kernels, rngs=rngs, remat=remat)
        self.decoder = Decoder(cfg, dtype=dtype, kernels=kernels, rngs=rngs, remat=remat)
        z2 = 2 * cfg.z_channels
        self.quant_conv = conv(z2, z2, 1, dtype=dtype, kernels=kernels, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = (
            conv(cfg.z_channels, cfg.z_channels, 1, dtype=dtype, kernels=kernels, rngs=rngs)
            if cfg.use_post_quant_conv
            else None
        )
        name_scopes(self)

    def posterior(self, x: jax.Array) -> latent.Posterior:
        """Image (B, H, W, C) -> the posterior over latents (B, H/f, W/f, z)."""
        check_image_shape(self.cfg, x.shape)
        return self.posterior_from_features(self.encoder.downsample_features(x.astype(self.dtype)))

    def posterior_from_features(self, h: jax.Array) -> latent.Posterior:
        """The encoder's global part: `encoder.downsample_features` -> the posterior."""
        moments = self.encoder.moments_from_features(h)
        if self.quant_conv is not None:
            moments = _call(self.quant_conv, moments)
        mean, logvar = latent.split_moments(moments.astype(jnp.float32))
        if self.cfg.latent_norm == "patch_layernorm":
            mean = latent.patch_layer_norm(mean, self.cfg.latent_norm_patch, self.cfg.latent_norm_eps)
        return latent.Posterior(mean, logvar, self.cfg.posterior == "deterministic")

    def encode(self, x: jax.Array) -> jax.Array:
        """Image -> the posterior mode (diffusers' `latent_dist.mode()`), float32, unscaled."""
        return self.posterior(x).mode()

    def decode_bottleneck(self, z: jax.Array) -> jax.Array:
        """The decoder's global part at the latent resolution (post_quant_conv, conv_in, mid)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = _call(self.post_quant_conv, z)
        return self.decoder.bottleneck(z)

    def decode_from_bottleneck(self, h: jax.Array) -> jax.Array:
        """The decoder's local part: `decode_bottleneck` output -> image, float32."""
        return self.image_from_features(self.decoder.upsample_features(h))

    def image_from_features(self, h: jax.Array) -> jax.Array:
        """The decoder's conv_out: `decode_features` output -> image, float32."""
        return _call(self.decoder.conv_out, h).astype(jnp.float32)

    def decode_features(self, z: jax.Array) -> jax.Array:
        """Latent -> the decoder's activations that feed conv_out (for the adaptive GAN weight)."""
        return self.decoder.upsample_features(self.decode_bottleneck(z))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent (B, h, w, z), unscaled -> image (B, h*f, w*f, C), float32."""
        check_latent_shape(self.cfg, z.shape)
        return self.image_from_features(self.decode_features(z))

    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, latent.Posterior]:
        """Reconstruction forward. With `train=True` (needs `key`), the latent is sampled
        from the posterior (if `cfg.sample_posterior`) and Sigma-VAE noise is added; with
        `train=False` it is the posterior mode and nothing is random.

        Returns (x_hat (B, H, W, C) float32, posterior).
        """
        posterior = self.posterior(x)
        if not train:
            return self.decode(posterior.mode()), posterior
        if key is None:
            raise ValueError("the training forward (train=True) needs a PRNG `key`")
        return self.decode(self.training_latent(posterior, key)), posterior

    def training_latent(self, posterior: latent.Posterior, key: jax.Array) -> jax.Array:
        """The latent the decoder sees in training: a posterior sample (if
        `cfg.sample_posterior`, else the mode) plus Sigma-VAE noise."""
        sample_key, noise_key = jax.random.split(key)
        z = posterior.sample(sample_key) if self.cfg.sample_posterior else posterior.mode()
        noise = self.cfg.noise
        return latent.add_sigma_noise(z, noise_key, noise.distribution, noise.strength)
