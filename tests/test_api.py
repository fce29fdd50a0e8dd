"""sigmavae_jax.load: jit-compiled encode/decode, pure functions for a user's jit, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images

import sigmavae_jax
from sigmavae_jax import api, checkpoint
from sigmavae_jax.config import Config


@pytest.fixture
def export(tiny_cfg, tmp_path):
    model = api.build_model(tiny_cfg, seed=3)
    params = api.params_of(model)
    path = checkpoint.save_params(tmp_path / "export", params, Config(model=tiny_cfg), source="test")
    return path, model


def test_load_round_trips_the_model(export):
    path, model = export
    codec = sigmavae_jax.load(path)
    x = jnp.asarray(images((2, 32, 48, 3)))
    with jax.default_matmul_precision("highest"):
        z = codec.encode(x)
        np.testing.assert_allclose(np.asarray(z), np.asarray(model.encode(x)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(codec.decode(z)), np.asarray(model.decode(z)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(codec.reconstruct(x)), np.asarray(codec.decode(z)), atol=1e-5)
    assert z.shape == (2, 8, 12, 4) and codec.model_config == model.cfg


def test_pure_functions_inside_a_user_jit(export):
    codec = sigmavae_jax.load(export[0])

    @jax.jit
    def user_step(params, x):
        z = codec.scale(codec.encode_fn(params, x))  # what a diffusion model would see
        return codec.decode_fn(params, codec.unscale(z)), z

    x = jnp.asarray(images((1, 16, 16, 3)))
    x_hat, z = user_step(codec.params, x)
    np.testing.assert_allclose(np.asarray(x_hat), np.asarray(codec.reconstruct(x)), atol=1e-5)
    # gradients flow through the pure functions
    grads = jax.grad(lambda p: jnp.mean(codec.reconstruct_fn(p, x) ** 2))(codec.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_bfloat16_compute_is_close_to_float32(export):
    f32 = sigmavae_jax.load(export[0])
    bf16 = sigmavae_jax.load(export[0], dtype="bfloat16")
    x = jnp.asarray(images((1, 32, 32, 3)))
    ref, got = np.asarray(f32.reconstruct(x)), np.asarray(bf16.reconstruct(x))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
    with pytest.raises(ValueError, match="dtype 'float16' unknown"):
        sigmavae_jax.load(export[0], dtype="float16")


@pytest.mark.parametrize("method", ["encode", "reconstruct"])
@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 30, 32, 3), "multiples of 4.*32x32"),
        ((1, 3, 32, 32), "looks like NCHW"),
        ((32, 32, 3), "NHWC"),
        # the whole input's shape, not that of one image of the batch map
        ((2, 3, 32, 32), r"got shape \(2, 3, 32, 32\).*looks like NCHW"),
        ((32, 48, 3), r"NHWC.*got shape \(32, 48, 3\)$"),
    ],
)
def test_bad_image_shapes_are_explained(export, method, shape, message):
    codec = sigmavae_jax.load(export[0])
    with pytest.raises(ValueError, match=message):
        getattr(codec, method)(jnp.zeros(shape))


@pytest.mark.parametrize("tiling", ["never", "always"])
def test_images_and_latents_that_are_not_floats_are_refused(export, tiling):
    codec = sigmavae_jax.load(export[0]).with_tiling(tiling, size=16, overlap=4)
    x = images((1, 32, 32, 3))
    for bad in ((x * 127.5 + 127.5).astype(np.uint8), (x * 100).astype(np.int32), x > 0, x.astype(np.complex64)):
        for method in ("encode", "reconstruct"):
            with pytest.raises(
                TypeError, match=rf"images must be floats in \[-1, 1\].*got dtype {bad.dtype}.*x / 127.5 - 1"
            ):
                getattr(codec, method)(bad)
    with pytest.raises(TypeError, match="latents must be floats.*got dtype int32"):
        codec.decode(np.zeros((1, 8, 8, 4), np.int32))


def test_float_dtypes_and_tracers_go_through(export):
    codec = sigmavae_jax.load(export[0])
    x = images((1, 32, 32, 3))
    z = np.asarray(codec.encode(x))
    for dtype in (np.float16, np.float64, jnp.bfloat16):  # numpy arrays, then a jax bfloat16 one
        np.testing.assert_allclose(np.asarray(codec.encode(x.astype(dtype))), z, atol=0.05)
        assert np.isfinite(np.asarray(codec.decode(z.astype(dtype)))).all()
    np.testing.assert_allclose(np.asarray(codec.encode(jnp.asarray(x, jnp.bfloat16))), z, atol=0.05)
    # the checks read the dtype, not values: jit and grad trace straight through them
    np.testing.assert_allclose(np.asarray(jax.jit(codec.encode)(x)), z, atol=1e-5)
    grad = jax.grad(lambda x: jnp.mean(codec.reconstruct(x) ** 2))(jnp.asarray(x))
    assert grad.shape == x.shape and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("load", [sigmavae_jax.load, api.load])
@pytest.mark.parametrize("path", [None, 123])
def test_a_path_that_is_no_path_is_a_type_error(load, path):
    with pytest.raises(TypeError, match=rf"params export path \(str or os.PathLike.*got {path} of type"):
        load(path)


@pytest.mark.parametrize("load", [sigmavae_jax.load, api.load])
@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_not_taken_for_the_working_directory(load, path):
    with pytest.raises(ValueError, match="params export path .*got an empty path"):
        load(path)


def test_missing_export_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_torch_weights.py"):
        sigmavae_jax.load(tmp_path)


def test_save_refuses_to_overwrite(export, tiny_cfg):
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save_params(export[0], {}, Config(model=tiny_cfg))


def test_params_that_do_not_fit_are_listed(tiny_cfg):
    params = api.params_of(api.build_model(tiny_cfg))
    params["decoder"]["conv_out"]["kernel"] = np.zeros((3, 3, 32, 4), np.float32)
    del params["quant_conv"]
    with pytest.raises(
        ValueError,
        match=r"(?s)2 missing.*quant_conv/bias.*mis-shaped.*"
        r"decoder/conv_out/kernel got \(3, 3, 32, 4\) instead of \(3, 3, 32, 3\)",
    ):
        api.build_model(tiny_cfg, params)


def test_forward_mode_passes_through_the_xla_kernels_and_is_refused_in_words_by_the_cpu_ones(export):
    path, _ = export
    z = jnp.asarray(images((1, 4, 4, 4), seed=1))
    direction = jnp.asarray(images((1, 4, 4, 4), seed=2))
    codec = sigmavae_jax.load(path, kernels="xla")
    _, tangent = jax.jvp(codec.decode, (z,), (direction,))
    eps = 1e-2  # the tangent is the decoder's directional derivative
    slope = (codec.decode(z + eps * direction) - codec.decode(z - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(slope), atol=2e-3, rtol=2e-2)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(sigmavae_jax.load(path, kernels="cpu").decode, (z,), (direction,))
