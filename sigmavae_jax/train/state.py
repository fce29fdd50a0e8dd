"""The training state (generator + discriminator params, optimizer states, EMA, step, rng)
and what it is built from: the module graphs and the two optax optimizers."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sigmavae_jax import parallel
from sigmavae_jax.config import Config, OptimConfig
from sigmavae_jax.kernels import XLA, Kernels
from sigmavae_jax.models.autoencoder import AutoencoderKL
from sigmavae_jax.models.discriminator import NLayerDiscriminator
from sigmavae_jax.models.init_rngs import init_rngs
from sigmavae_jax.models.params import DTYPES, flatten_params, unflatten_params

TRAINED, FROZEN = "trained", "frozen"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays (checkpointed whole).

    params: {"vae": nested dict of AutoencoderKL params, "logvar": scalar}, the generator
    optimizer's parameters. ema: an exponential moving average of params["vae"] (or None).
    """

    step: jax.Array
    rng: jax.Array
    params: dict[str, Any]
    opt_state: Any
    disc_params: dict[str, Any]
    disc_stats: dict[str, Any]
    disc_opt_state: Any
    ema: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class TrainStructure:
    """The static half of training, beside the `TrainState`: module graphs, optimizers, the
    trained parameter paths and the kernels (nothing here is checkpointed)."""

    vae: Any  # nnx.GraphDef of AutoencoderKL
    disc: Any  # nnx.GraphDef of NLayerDiscriminator
    gen_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    trained_paths: frozenset  # flat paths of the VAE params the generator optimizer updates
    kernels: Kernels  # how convolutions and the GAN's branches are computed (the compile target's)


def learning_rate_schedule(cfg: OptimConfig, lr: float, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant or cosine decay to 0."""
    warmup = cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), 0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def adam(cfg: OptimConfig, lr: float, total_steps: int) -> optax.GradientTransformation:
    """Adam(W) with the config's betas, schedule and optional global-norm clipping."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg, lr, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*parts)


def select_trained_paths(vae_params: dict[str, Any], prefixes: tuple[str, ...]) -> frozenset:
    """Flat param paths under any of `prefixes` ("decoder", "decoder/up/0", ...); all if empty."""
    paths = list(flatten_params(vae_params))
    if not prefixes:
        return frozenset(paths)
    names = {path: "/".join(map(str, path)) for path in paths}
    chosen, unmatched = set(), []
    for prefix in prefixes:
        prefix = prefix.strip("/")
        hits = {p for p, name in names.items() if name == prefix or name.startswith(prefix + "/")}
        if not hits:
            unmatched.append(prefix)
        chosen |= hits
    if unmatched:
        tops = sorted({str(p[0]) for p in paths})
        raise ValueError(
            f"train.trainable entries {unmatched} match no parameter; use path prefixes such as {tops} "
            "or deeper ones like 'decoder/up/0'"
        )
    return frozenset(chosen)


def generator_labels(vae_params: dict[str, Any], trained: frozenset, learn_logvar: bool) -> dict[str, Any]:
    """The optax label tree of the generator optimizer's params."""
    flat = {path: (TRAINED if path in trained else FROZEN) for path in flatten_params(vae_params)}
    return {"vae": unflatten_params(flat), "logvar": TRAINED if learn_logvar else FROZEN}


def build_structure(cfg: Config, kernels: Kernels = XLA) -> TrainStructure:
    """Module graphs (compute dtype and remat from cfg.train, convolutions by `kernels`: pass
    `kernels.for_mesh(cfg.train.kernels, mesh)` for the mesh the step is compiled for) and the
    two optimizers."""
    dtype = DTYPES[cfg.train.compute_dtype]
    vae = nnx.eval_shape(
        lambda: AutoencoderKL(cfg.model, rngs=init_rngs(0), dtype=dtype, remat=cfg.train.remat, kernels=kernels)
    )
    disc = nnx.eval_shape(
        lambda: NLayerDiscriminator(
            cfg.discriminator, in_channels=cfg.model.out_channels, rngs=init_rngs(0), dtype=dtype
        )
    )
    vae_graph, vae_params = nnx.split(vae)
    disc_graph = nnx.graphdef(disc)
    vae_params = nnx.to_pure_dict(vae_params)
    trained = select_trained_paths(vae_params, cfg.train.trainable)
    labels = generator_labels(vae_params, trained, cfg.loss.learn_logvar)
    gen_tx = optax.multi_transform(
        {TRAINED: adam(cfg.optim, cfg.optim.lr, cfg.train.steps), FROZEN: optax.set_to_zero()}, labels
    )
    disc_tx = adam(cfg.optim, cfg.optim.disc_lr or cfg.optim.lr, cfg.train.steps)
    return TrainStructure(
        vae=vae_graph, disc=disc_graph, gen_tx=gen_tx, disc_tx=disc_tx, trained_paths=trained, kernels=kernels
    )


def init_state(
    cfg: Config, modules: TrainStructure, key: jax.Array, vae_params: dict[str, Any] | None = None
) -> TrainState:
    """A fresh TrainState; `vae_params` (e.g. converted weights) replaces the random VAE init.
    Pure: jit it with out_shardings so the state is born sharded."""
    vae_key, disc_key, rng = jax.random.split(key, 3)
    if vae_params is None:
        model = AutoencoderKL(cfg.model, rngs=init_rngs(vae_key))
        vae_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    disc = NLayerDiscriminator(cfg.discriminator, in_channels=cfg.model.out_channels, rngs=init_rngs(disc_key))
    disc_params = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
    disc_stats = nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))
    params = {"vae": vae_params, "logvar": jnp.asarray(cfg.loss.logvar_init, jnp.float32)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        params=params,
        opt_state=modules.gen_tx.init(params),
        disc_params=disc_params,
        disc_stats=disc_stats,
        disc_opt_state=modules.disc_tx.init(disc_params),
        ema=jax.tree.map(jnp.copy, vae_params) if cfg.train.ema_decay > 0 else None,
    )


def state_shapes(cfg: Config, modules: TrainStructure) -> TrainState:
    """The shapes and dtypes of a fresh TrainState (ShapeDtypeStructs; no memory)."""
    return jax.eval_shape(lambda key: init_state(cfg, modules, key), jax.random.key(0))


def state_shardings(cfg: Config, modules: TrainStructure, mesh: Mesh) -> TrainState:
    """The shardings of every TrainState leaf on `mesh`: replicated, or FSDP-split for big
    arrays (`parallel.tree_shardings`)."""
    return parallel.tree_shardings(mesh, state_shapes(cfg, modules), cfg.train.fsdp_min_size)


def create_state(
    cfg: Config, modules: TrainStructure, mesh: Mesh, key: jax.Array, vae_params: dict[str, Any] | None = None
) -> tuple[TrainState, TrainState]:
    """A TrainState born sharded over `mesh` (never materialised on one device first),
    and the shardings of its leaves (`state_shardings`)."""
    init = lambda key, vae_params: init_state(cfg, modules, key, vae_params)  # noqa: E731
    shardings = state_shardings(cfg, modules, mesh)
    state = jax.jit(init, out_shardings=shardings)(key, vae_params)
    return state, shardings
