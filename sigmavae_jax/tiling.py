"""Encode and decode images larger than memory allows, tile by tile.

A tile sees only its own pixels, so convolutions near a tile edge and the per-image statistics
(GroupNorm, attention) differ from an untiled pass. Neighbouring tiles therefore overlap and
are blended with weights that fall linearly to almost zero towards a tile's inner edges: every
output pixel is a weighted mean of the tiles covering it, and each tile counts least exactly
where it is least reliable. Image borders are not inner edges and keep full weight.

The blend runs on the host in float32 numpy, so a 4096 x 4096 output costs host memory only;
the device sees one tile batch at a time, and all tiles share one shape (one compilation):
the last tile of a row or column is moved back to end at the border instead of being cut short.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sigmavae_jax.models.layers import GroupNorm

Mode = Literal["auto", "always", "never"]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """When and how `Codec.encode`/`decode` tile, in IMAGE pixels (latent tiles are size / f).

    mode: "auto" tiles images with more than `auto_pixels` pixels (height x width), "always"
      tiles whenever the image is larger than one tile, "never" runs the whole image at once.
    size: the side of a square tile; overlap: pixels neighbouring tiles share (at most size/2).
    shared_stats: every tile normalises with GroupNorm statistics merged over all tiles (a first
      sweep records them), not its own: tiles then agree in colour and contrast, at the price
      of running the local layers twice. The global layers (the mid block with its attention)
      always run on the whole latent at once.
    stat_sweeps: recording sweeps before the final one. Sweep k records the statistics of the
      k-th GroupNorm exactly (up to tile borders) once the earlier ones are exact, so as many
      sweeps as the tiled part has GroupNorms give the untiled statistics. One suffices for
      trained models (docs/performance.md has the figures); an untrained model, whose layers
      amplify every difference, needs them all.
    """

    mode: Mode = "auto"
    size: int = 512
    overlap: int = 128
    auto_pixels: int = 1024 * 1024
    shared_stats: bool = True
    stat_sweeps: int = 1

    def __post_init__(self):
        if self.mode not in ("auto", "always", "never"):
            raise ValueError(f"tiling mode {self.mode!r} unknown; use 'auto', 'always' or 'never'")
        if self.stat_sweeps < 1:
            raise ValueError(f"stat_sweeps {self.stat_sweeps} must be at least 1 (or set shared_stats=False)")
        if self.size <= 0 or not 0 <= self.overlap <= self.size // 2:
            raise ValueError(
                f"tile size {self.size} / overlap {self.overlap}: need size > 0 and 0 <= overlap <= size/2 "
                "(e.g. size 512, overlap 128)"
            )

    def applies(self, height: int, width: int) -> bool:
        if self.mode == "never" or (height <= self.size and width <= self.size):
            return False
        return self.mode == "always" or height * width > self.auto_pixels

    def check_multiple(self, multiple: int) -> None:
        """Tile corners must sit on the model's grid (the spatial factor, times the latent-norm
        patch), or encoding a tile would not reproduce the untiled latent positions."""
        for name, value in (("size", self.size), ("overlap", self.overlap)):
            if value % multiple:
                raise ValueError(
                    f"tile {name} {value} is not a multiple of {multiple}, this model's spatial multiple; "
                    f"use e.g. {max(multiple, value // multiple * multiple)}"
                )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, length), neighbours sharing at least
    `overlap`; the last tile ends at `length`. One tile when `length <= tile`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _edge_weights(starts: list[int], tile: int, length: int) -> list[np.ndarray]:
    """Per tile, a (tile,) weight vector: 1 inside, rising linearly across the span it shares
    with the previous tile and falling across the span it shares with the next one, then
    divided by the sum over tiles, so the weights at every position sum to one (the last tile,
    moved back to end at the border, may overlap two others)."""
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(min(tile, length), np.float32)
        if i > 0:
            shared = starts[i - 1] + tile - start
            w[:shared] = np.minimum(w[:shared], (np.arange(shared) + 1) / (shared + 1))
        if i + 1 < len(starts):
            shared = start + tile - starts[i + 1]
            w[tile - shared :] = np.minimum(w[tile - shared :], (shared - np.arange(shared)) / (shared + 1))
        weights.append(w)
    total = np.zeros(length, np.float32)
    for start, w in zip(starts, weights):
        total[start : start + len(w)] += w
    return [w / total[start : start + len(w)] for start, w in zip(starts, weights)]


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Where the tiles of one axis sit, in input and output pixels, and their blend weights
    at both resolutions."""

    starts: list[int]
    tile: int
    out_starts: list[int]
    out_tile: int
    weights: list[np.ndarray]  # per tile, at the output resolution
    fine_weights: list[np.ndarray]  # per tile, at the finer of the two resolutions

    @classmethod
    def plan(cls, length: int, tile: int, overlap: int, scale: Fraction) -> "_Grid":
        tile = min(tile, length)
        starts = tile_starts(length, tile, overlap)
        out_starts, out_tile = [int(s * scale) for s in starts], int(tile * scale)
        weights = _edge_weights(out_starts, out_tile, int(length * scale))
        fine = weights if scale >= 1 else _edge_weights(starts, tile, length)
        return cls(starts, tile, out_starts, out_tile, weights, fine)


Record = tuple[jax.Array, jax.Array, jax.Array]  # (weight sum, weighted mean, weighted squared deviations)
Stats = dict[str, tuple[Any, Any]]  # GroupNorm path -> (mean, var), each (B, groups)


class TileGroupNorm(nnx.Module):
    """Stands in for one `GroupNorm` on the tiled path (see `use_tile_norms`).

    It normalises with `stats` (mean, var), each (B, groups), when given, else with the tile's
    own statistics; with a `weight` it also sets `record` to its input's statistics weighted by
    `weight` (the tile's blend weights at the largest resolution the model sees, (H, W),
    average-pooled to the layer's): (weight sum, mean, sum of weighted squared deviations),
    each (B, groups), so that tiles merge exactly (`combine_stats`). Computes in float32 and
    returns the input's dtype, with the GroupNorm's own scale, bias and epsilon.
    """

    def __init__(self, norm: GroupNorm, weight: jax.Array | None, stats: tuple[Any, Any] | None):
        self.norm = norm
        self.weight = nnx.data(weight)
        self.stats = nnx.data(stats)
        self.record: Record | None = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = self.norm.num_groups
        xg = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
        if self.weight is not None:
            pool = self.weight.shape[0] // h
            weight = self.weight.reshape(h, pool, w, pool).mean((1, 3))[None, :, :, None, None]
            weight_sum = weight.sum() * (c // groups)
            tile_mean = (xg * weight).sum((1, 2, 4)) / weight_sum
            deviation = ((xg - tile_mean[:, None, None, :, None]) ** 2 * weight).sum((1, 2, 4))
            self.record = (jnp.broadcast_to(weight_sum, tile_mean.shape), tile_mean, deviation)
        if self.stats is None:
            mean = xg.mean((1, 2, 4))
            var = ((xg - mean[:, None, None, :, None]) ** 2).mean((1, 2, 4))
        else:
            mean, var = self.stats
        y = (xg - mean[:, None, None, :, None]) * jax.lax.rsqrt(var + self.norm.epsilon)[:, None, None, :, None]
        return (y.reshape(b, h, w, c) * self.norm.scale[...] + self.norm.bias[...]).astype(x.dtype)


def use_tile_norms(model: nnx.Module, weight: jax.Array | None, stats: Stats | None) -> dict[str, TileGroupNorm]:
    """Replaces, in place, every `GroupNorm` of `model` by a `TileGroupNorm` normalising with
    `stats[path]` (when `stats` has the path) and recording with `weight`. Returns them by path
    ("decoder/up/0/block/1/norm2"): after the model ran, those it called hold their `record`."""
    replaced = {}
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, GroupNorm):
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            name = "/".join(map(str, path))
            replaced[name] = TileGroupNorm(module, weight, (stats or {}).get(name))
            setattr(parent, path[-1], replaced[name])
    return replaced


def tile_passes(graphdef: Any, method: Callable[[nnx.Module, jax.Array], jax.Array]) -> tuple[Callable, Callable]:
    """(record, apply) for `tiled_apply`, both jitted functions of (params, x_tile, weight, stats)
    running `method(model, x_tile)` with tile GroupNorms (`use_tile_norms`): `record` returns
    the records of the GroupNorms `method` calls, by path; `apply` returns its output."""

    def run(params, x, weight, stats):
        model = nnx.merge(graphdef, params)
        norms = use_tile_norms(model, weight, stats)
        out = method(model, x)
        return out, {name: norm.record for name, norm in norms.items() if norm.record is not None}

    record = jax.jit(lambda params, x, weight, stats: run(params, x, weight, stats)[1])
    apply = jax.jit(lambda params, x, weight, stats: run(params, x, weight, stats)[0])
    return record, apply


def combine_stats(records: list[dict[str, Record]]) -> Stats:
    """Per GroupNorm path, the (mean, var) of the whole image from the tiles' weighted records
    (`TileGroupNorm.record`, one dict per tile), merged in float64 (Chan et al.); float32."""
    combined = {}
    for name in records[0]:
        n, means, m2 = (np.stack([np.asarray(tile[name][i], np.float64) for tile in records]) for i in range(3))
        total = n.sum(0)
        mean = (n * means).sum(0) / total
        var = (m2 + n * (means - mean) ** 2).sum(0) / total
        combined[name] = (mean.astype(np.float32), var.astype(np.float32))
    return combined


def tiled_apply(
    apply: Callable,
    x: np.ndarray,
    *,
    tile: int,
    overlap: int,
    scale: Fraction,
    record: Callable | None = None,
    stat_sweeps: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Applies a spatially-equivariant network to `x` (B, H, W, C) tile by tile and blends
    the outputs ((B, t, t, C) -> (B, t*scale, t*scale, C')). `tile` and `overlap` are in x's
    pixels; tile * scale and every start * scale must be whole numbers.

    With `record(x_tile, fine_weight, stats) -> records` (see `tile_passes`),
    `stat_sweeps` sweeps record the tiles' GroupNorm statistics, each normalising with the
    merge of the previous one (the first with each tile's own), and the final sweep,
    `apply(x_tile, fine_weight, stats)`, normalises every tile with the last merge. Without
    it, `apply(x_tile, None, None)` normalises each tile by itself.
    """
    b, height, width, _ = x.shape
    rows, cols = _Grid.plan(height, tile, overlap, scale), _Grid.plan(width, tile, overlap, scale)
    tiles = [(r, c) for r in range(len(rows.starts)) for c in range(len(cols.starts))]

    def tile_input(r, c):
        top, left = rows.starts[r], cols.starts[c]
        fine = np.outer(rows.fine_weights[r], cols.fine_weights[c]) if record else None
        return x[:, top : top + rows.tile, left : left + cols.tile], fine

    sweeps = 1 + stat_sweeps if record else 1
    total = norm = stats = None
    with tqdm(
        total=len(tiles) * sweeps,
        desc="tiles",
        unit="tile",
        leave=False,
        disable=not progress or len(tiles) * sweeps < 8,
    ) as bar:
        for _ in range(stat_sweeps if record else 0):
            records = []
            for r, c in tiles:
                records.append(record(*tile_input(r, c), stats))
                bar.update()
            stats = combine_stats(records)
        for r, c in tiles:
            out = np.asarray(apply(*tile_input(r, c), stats), np.float32)
            if total is None:
                total = np.zeros((b, int(height * scale), int(width * scale), out.shape[-1]), np.float32)
                norm = np.zeros(total.shape[1:3] + (1,), np.float32)
            weight = np.outer(rows.weights[r], cols.weights[c])[..., None]
            ot, ol = rows.out_starts[r], cols.out_starts[c]
            total[:, ot : ot + rows.out_tile, ol : ol + cols.out_tile] += out * weight
            norm[ot : ot + rows.out_tile, ol : ol + cols.out_tile] += weight
            bar.update()
    return total / norm
