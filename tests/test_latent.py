"""Posterior, NextStep-1 latent normalisation and Sigma-VAE noise (DESIGN sections 3-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images

from sigmavae_jax import api
from sigmavae_jax.config import ModelConfig, SigmaNoiseConfig
from sigmavae_jax.models import latent


def nextstep_norm_numpy(mean_nchw: np.ndarray, patch: int = 2, eps: float = 1e-6) -> np.ndarray:
    """DESIGN section 3, literally: patchify to c*p*p channels (index c*4 + i*2 + j),
    LayerNorm without affine over those channels, un-patchify. NCHW in and out."""
    b, c, h, w = mean_nchw.shape
    x = mean_nchw.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.transpose(0, 1, 3, 5, 2, 4).reshape(b, c * patch * patch, h // patch, w // patch)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    x = (x - mu) / np.sqrt(var + eps)
    x = x.reshape(b, c, patch, patch, h // patch, w // patch).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h, w)


def test_patch_layer_norm_matches_numpy_reference():
    mean = np.random.default_rng(0).normal(2.0, 3.0, (2, 16, 6, 10)).astype(np.float64)
    want = nextstep_norm_numpy(mean)
    got = latent.patch_layer_norm(jnp.asarray(mean.transpose(0, 2, 3, 1), jnp.float32), 2, 1e-6)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5)


def test_nextstep_model_encode_is_normalised_deterministic_mean():
    cfg = ModelConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=16,
        norm_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        posterior="deterministic",
        latent_norm="patch_layernorm",
    )
    model = api.build_model(cfg)
    x = jnp.asarray(images((2, 16, 24, 3)))
    moments = np.asarray(model.encoder(x), np.float64)  # raw encoder output (B, h, w, 32)
    want = nextstep_norm_numpy(moments[..., :16].transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    posterior = model.posterior(x)
    np.testing.assert_allclose(np.asarray(model.encode(x)), want, atol=2e-5)
    assert posterior.deterministic
    np.testing.assert_array_equal(np.asarray(posterior.kl()), np.zeros(2))
    np.testing.assert_array_equal(posterior.sample(jax.random.key(0)), posterior.mean)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(jnp.zeros((1, 18, 24, 3)))  # latent 9x12: no whole 2x2 patches


def test_gaussian_posterior_logvar_clip_and_kl():
    moments = jnp.concatenate(
        [jnp.full((1, 2, 2, 3), 0.5), jnp.array([-50.0, 0.0, 50.0]).reshape(1, 1, 1, 3) * jnp.ones((1, 2, 2, 3))], -1
    )
    mean, logvar = latent.split_moments(moments)
    np.testing.assert_array_equal(np.asarray(logvar[0, 0, 0]), [-30.0, 0.0, 20.0])
    post = latent.Posterior(mean, logvar, False)
    m, lv = 0.5, np.array([-30.0, 0.0, 20.0])
    want = 4 * 0.5 * np.sum(m**2 + np.exp(lv) - 1.0 - lv)
    np.testing.assert_allclose(np.asarray(post.kl()), [want], rtol=1e-5)


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_sigma_is_drawn_once_per_sample(distribution):
    strength = 0.5
    z = jnp.zeros((64, 32, 32, 4))
    noise = np.asarray(latent.add_sigma_noise(z, jax.random.key(3), distribution, strength))
    halves = noise.reshape(64, 2, -1).std(axis=2)  # (B, 2): std of each half of a sample
    # One sigma per sample: both halves of a sample share it; samples differ.
    np.testing.assert_allclose(halves[:, 0], halves[:, 1], rtol=0.08, atol=1e-3)
    per_sample = halves.mean(axis=1)
    assert per_sample.std() > 0.05
    sigma = np.asarray(latent.draw_sigma(jax.random.key(4), 20000, distribution, strength)).ravel()
    if distribution == "uniform":
        assert sigma.min() >= 0.0 and sigma.max() <= strength
        np.testing.assert_allclose(sigma.mean(), strength / 2, atol=0.01)
        assert per_sample.max() <= strength * 1.05
    else:
        assert (sigma < 0).mean() == pytest.approx(0.5, abs=0.02)
        np.testing.assert_allclose(sigma.std(), strength, rtol=0.03)


def test_noise_only_in_training_forward(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"noise": SigmaNoiseConfig(distribution="uniform", strength=0.5)})
    model = api.build_model(cfg)
    x = jnp.asarray(images((2, 16, 16, 3)))
    deterministic = np.asarray(model.decode(model.encode(x)))
    eval_out, _ = model(x, train=False)
    np.testing.assert_array_equal(np.asarray(eval_out), deterministic)
    np.testing.assert_array_equal(np.asarray(model(x, train=False)[0]), deterministic)
    train_a, _ = model(x, key=jax.random.key(0), train=True)
    train_b, _ = model(x, key=jax.random.key(1), train=True)
    assert np.abs(np.asarray(train_a) - deterministic).max() > 1e-3
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3
    with pytest.raises(ValueError, match="needs a PRNG"):
        model(x, train=True)


def test_training_forward_without_noise_or_sampling_is_the_mode(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"sample_posterior": False})
    model = api.build_model(cfg)
    x = jnp.asarray(images((1, 16, 16, 3)))
    train_out, _ = model(x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(np.asarray(train_out), np.asarray(model(x)[0]))


def test_scale_unscale_are_inverse():
    z = jnp.asarray(images((1, 4, 4, 16)))
    scaled = latent.scale_latent(z, 0.3611, 0.1159)
    np.testing.assert_allclose(np.asarray(scaled), (np.asarray(z) - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(latent.unscale_latent(scaled, 0.3611, 0.1159)), np.asarray(z), atol=1e-6)
