"""Tiled encode/decode: tile plans, merged GroupNorm statistics, blockwise attention, and
agreement with the untiled model on a 512 x 512 photo, without seams."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage import data as skdata
from skimage import transform

from sigmavae_jax import api, tiling
from sigmavae_jax.config import load_config
from sigmavae_jax.models import layers

SIZE, TILE, OVERLAP = 512, 256, 128


def psnr(a, b) -> float:
    a, b = (np.clip((np.asarray(v) + 1) / 2, 0, 1) for v in (a, b))
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize(
    "length, tile, overlap", [(512, 256, 128), (300, 64, 16), (100, 64, 32), (64, 64, 16), (40, 64, 8)]
)
def test_tiles_cover_the_axis_and_blend_weights_sum_to_one(length, tile, overlap):
    for scale in (Fraction(1), Fraction(4), Fraction(1, 4)):
        grid = tiling._Grid.plan(length, tile, overlap, scale)
        assert grid.starts[0] == 0 and grid.starts[-1] + grid.tile == min(length, max(length, tile))
        assert all(b - a <= tile - overlap for a, b in zip(grid.starts, grid.starts[1:]))
        for weights, starts, size in ((grid.weights, grid.out_starts, grid.out_tile), (grid.fine_weights, None, None)):
            starts = starts if starts is not None else (grid.out_starts if scale >= 1 else grid.starts)
            size = size if size is not None else len(weights[0])
            total = np.zeros(max(s + size for s in starts))
            for start, w in zip(starts, weights):
                assert w.min() > 0
                total[start : start + size] += w
            np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_merged_tile_statistics_are_the_whole_image_statistics():
    """Weighted per-tile records merge to the whole image's GroupNorm mean/var, and
    normalising with them reproduces flax's GroupNorm."""
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (2, 40, 56, 16)), jnp.float32)
    norm = layers.GroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    norm.bias[...] = jnp.linspace(-1, 1, 16)
    rows, cols = tiling._Grid.plan(40, 24, 8, Fraction(1)), tiling._Grid.plan(56, 24, 8, Fraction(1))
    records = []
    for r, top in enumerate(rows.starts):
        for c, left in enumerate(cols.starts):
            weight = jnp.asarray(np.outer(rows.fine_weights[r], cols.fine_weights[c]))
            tile_norm = tiling.TileGroupNorm(norm, weight, None)
            tile_norm(x[:, top : top + rows.tile, left : left + cols.tile])
            records.append({"norm": tile_norm.record})
    ((mean, var),) = tiling.combine_stats(records).values()
    groups = np.asarray(x, np.float64).reshape(2, 40, 56, 4, 4)
    np.testing.assert_allclose(mean, groups.mean((1, 2, 4)), rtol=1e-5)
    np.testing.assert_allclose(var, groups.var((1, 2, 4)), rtol=1e-5)
    shared = tiling.TileGroupNorm(norm, None, (jnp.asarray(mean), jnp.asarray(var)))(x)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(norm(x)), atol=2e-5)


def test_blockwise_attention_equals_full_attention(monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK", 16)
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 100, 1, 8)), jnp.float32) for i in range(3))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            np.asarray(layers.attention(q, k, v)), np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=1e-5
        )


def test_tiling_settings_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        tiling.Tiling("always", size=256, overlap=200)
    with pytest.raises(ValueError, match="mode"):
        tiling.Tiling("sometimes")
    with pytest.raises(ValueError, match="multiple of 8"):
        tiling.Tiling("always", size=100, overlap=20).check_multiple(8)
    auto = tiling.Tiling()
    assert not auto.applies(1024, 1024) and auto.applies(1024, 1032) and not tiling.Tiling("never").applies(4096, 4096)
    assert tiling.Tiling("always", size=256).applies(512, 256) and not tiling.Tiling("always", size=256).applies(
        256, 256
    )


@pytest.fixture(scope="module")
def photo_codec():
    cfg = load_config("tiny")
    codec = api.codec_from_model(api.build_model(cfg.model, seed=0), cfg)
    photo = transform.resize(skdata.astronaut(), (SIZE, SIZE), anti_aliasing=True).astype(np.float32)
    return codec, photo[None] * 2 - 1


def _seam_ratio(tiled, untiled, overlap: int) -> float:
    """Mean error within 4 pixels of the tile edges over the mean error elsewhere."""
    starts = tiling.tile_starts(SIZE, TILE, overlap)
    error = np.abs(np.asarray(tiled) - np.asarray(untiled)).mean((0, 3))
    band = np.zeros(error.shape, bool)
    for edge in {*starts[1:], *(s + TILE for s in starts[:-1])}:  # where one tile's pixels end and another's begin
        band[max(edge - 4, 0) : edge + 4, :] = True
        band[:, max(edge - 4, 0) : edge + 4] = True
    return float(error[band].mean() / error[~band].mean())


def test_tiled_decode_matches_untiled_without_seams(photo_codec):
    codec, x = photo_codec
    z = codec.encode(x)
    untiled, tiled = codec.decode(z), codec.with_tiling("always", size=TILE, overlap=OVERLAP).decode(z)
    assert tiled.shape == untiled.shape == x.shape
    assert psnr(tiled, untiled) >= 40.0
    assert _seam_ratio(tiled, untiled, OVERLAP) <= 1.5
    # the measure sees seams where there are some: abutting tiles, each with its own statistics
    hard = codec.with_tiling("always", size=TILE, overlap=0, shared_stats=False).decode(z)
    assert _seam_ratio(hard, untiled, 0) > 1.5


def test_tiled_reconstruction_matches_untiled(photo_codec):
    """Encode and decode both tiled. An untrained encoder amplifies every statistics
    difference, so it gets one recording sweep per GroupNorm of its tiled part (six in the
    tiny config): the merged statistics are then the untiled ones."""
    codec, x = photo_codec
    tiled = codec.with_tiling("always", size=TILE, overlap=OVERLAP, stat_sweeps=6)
    latents = tiled.encode(x)
    assert latents.shape == codec.encode(x).shape
    assert psnr(tiled.reconstruct(x), codec.reconstruct(x)) >= 40.0


def test_untiled_below_the_threshold_is_the_plain_function(photo_codec):
    codec, x = photo_codec
    small = x[:, :128, :128]
    with jax.default_matmul_precision("highest"):
        expected = codec.encode_fn(codec.params, jnp.asarray(small))
        np.testing.assert_allclose(np.asarray(codec.encode(small)), np.asarray(expected), atol=1e-5)
    with pytest.raises(ValueError, match="channels last"):
        codec.with_tiling("always", size=64, overlap=16).encode(np.zeros((1, 3, 256, 256), np.float32))


def test_tile_records_are_keyed_by_the_group_norms_the_tiled_part_calls(photo_codec):
    """The statistics travel in and out of the tiled pass explicitly, by module path: the
    decoder's local part records its up levels and norm_out, not the mid block it leaves to the
    global pass, and statistics given for a path are the ones that path normalises with."""
    codec, _ = photo_codec
    record, apply = tiling.tile_passes(codec.graphdef, lambda m, h: m.decode_from_bottleneck(h))
    channels = codec.config.model.ch * codec.config.model.ch_mult[-1]
    h = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 16, channels)), jnp.float32)
    weight = jnp.ones((16 * codec.config.model.downsample_factor,) * 2)
    records = record(codec.params, h, weight, None)
    model = nnx.merge(codec.graphdef, codec.params)
    norms = {"/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, layers.GroupNorm)}
    expected = {n for n in norms if n.startswith("decoder/") and not n.startswith("decoder/mid/")}
    assert set(records) == expected and "decoder/norm_out" in expected
    own = apply(codec.params, h, None, None)
    stats = tiling.combine_stats([records])
    np.testing.assert_allclose(np.asarray(apply(codec.params, h, None, stats)), np.asarray(own), atol=1e-4)
    shifted = dict(stats, **{"decoder/norm_out": (stats["decoder/norm_out"][0] + 1, stats["decoder/norm_out"][1])})
    assert np.abs(np.asarray(apply(codec.params, h, None, shifted)) - np.asarray(own)).max() > 1e-2
