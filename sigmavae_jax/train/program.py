"""The training program for a mesh: the module graphs, the LPIPS network, the jitted G+D step
and the shardings of its arguments, built one way for a real run (`train.loop`) and for a
compile-only dry run (`sigmavae_jax.dry_run`), so that both compile the same program."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sigmavae_jax import kernels, parallel
from sigmavae_jax.config import Config
from sigmavae_jax.models.lpips import LPIPS, load_lpips, lpips_weight_shapes
from sigmavae_jax.models.params import DTYPES
from sigmavae_jax.train.state import TrainState, TrainStructure, build_structure, state_shapes, state_shardings
from sigmavae_jax.train.step import compile_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What the step of `cfg` on `mesh` is made of.

    step: the jitted step `(state, images, lpips_vars) -> (state, metrics)`, state donated.
    state_shardings: a TrainState of shardings (replicated, or FSDP-split for big arrays).
    lpips_vars: the LPIPS variables (arrays, or ShapeDtypeStructs when built abstract), None
    when the perceptual weight is 0.
    """

    cfg: Config
    mesh: Mesh
    modules: TrainStructure
    step: Any
    state_shardings: TrainState
    lpips_vars: Any

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, without memory."""
        shapes = state_shapes(self.cfg, self.modules)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_shardings
        )

    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        """The global image batch, (train.batch_size, S, S, 3) float32 split over the mesh."""
        size = self.cfg.train.image_size
        shape = (self.cfg.train.batch_size, size, size, self.cfg.model.in_channels)
        return jax.ShapeDtypeStruct(shape, np.float32, sharding=parallel.batch_sharding(self.mesh))

    def abstract_arguments(self) -> tuple[TrainState, jax.ShapeDtypeStruct, Any]:
        """(state, images, lpips_vars) as the step takes them, all abstract."""
        lpips = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(self.mesh)), self.lpips_vars
        )
        return self.abstract_state(), self.abstract_batch(), lpips


def abstract_lpips(dtype) -> LPIPS:
    """An LPIPS network of ShapeDtypeStructs: its shapes without reading any weights."""
    return nnx.eval_shape(
        lambda: LPIPS({key: jnp.zeros(shape, jnp.float32) for key, shape in lpips_weight_shapes().items()}, dtype=dtype)
    )


def build_program(cfg: Config, mesh: Mesh, *, abstract: bool = False) -> TrainProgram:
    """The step of `cfg` compiled for `mesh`, with the kernels of the mesh's devices
    (`cfg.train.kernels`). abstract: the LPIPS network as shapes only (no weights read).

    Raises ValueError when the global batch does not split over the mesh's devices.
    """
    parallel.check_batch_size(cfg.train.batch_size, mesh)
    modules = build_structure(cfg, kernels.for_mesh(cfg.train.kernels, mesh))
    lpips_graph = lpips_vars = None
    if cfg.loss.perceptual_weight > 0:
        dtype = DTYPES[cfg.train.compute_dtype]
        lpips = abstract_lpips(dtype) if abstract else load_lpips(cfg.loss.lpips_weights, dtype=dtype)
        lpips_graph, lpips_vars = nnx.split(lpips)
    shardings = state_shardings(cfg, modules, mesh)
    step = compile_train_step(make_train_step(cfg, modules, lpips_graph), shardings, mesh, lpips_vars)
    return TrainProgram(
        cfg=cfg, mesh=mesh, modules=modules, step=step, state_shardings=shardings, lpips_vars=lpips_vars
    )
