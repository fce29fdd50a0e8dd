"""Our AutoencoderKL against diffusers' torch AutoencoderKL on the same random weights,
loaded through both checkpoint layouts (diffusers folder, LDM safetensors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images
from torch_reference import make_torch_vae, random_ldm_state_dict, save_ldm, torch_encode_decode

from sigmavae_jax import api
from sigmavae_jax.convert import ConversionWarning, load_torch_weights

TOLERANCE = 1e-4  # max abs error, float32 with HIGHEST matmul/conv precision

TINY = {
    "sd_like": dict(latent_channels=4, quant_convs=True),
    "flux_like": dict(latent_channels=16, quant_convs=False),
}


def jax_encode_decode(model, x):
    with jax.default_matmul_precision("highest"):
        z = model.encode(jnp.asarray(x))
        return np.asarray(z), np.asarray(model.decode(z))


def assert_parity(source, vae, x):
    if str(source).endswith(".safetensors"):  # a bare LDM file cannot tell its family
        with pytest.warns(ConversionWarning, match="scaling factor cannot be read from the weights"):
            converted = load_torch_weights(source)
    else:
        converted = load_torch_weights(source)
    model = api.build_model(converted.config.model, converted.params)
    want_z, want_x = torch_encode_decode(vae, x)
    got_z, got_x = jax_encode_decode(model, x)
    assert got_z.shape == want_z.shape and got_x.shape == want_x.shape
    assert np.abs(got_z - want_z).max() <= TOLERANCE
    assert np.abs(got_x - want_x).max() <= TOLERANCE
    assert np.abs(want_x).max() > 0.1  # the comparison is not between near-zero outputs


@pytest.mark.parametrize("kind", sorted(TINY))
def test_diffusers_folder_parity(kind, tmp_path):
    vae = make_torch_vae(**TINY[kind])
    vae.save_pretrained(tmp_path / "vae")
    assert_parity(tmp_path / "vae", vae, images((2, 48, 80, 3)))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_ldm_safetensors_parity(kind, tmp_path):
    vae = make_torch_vae(**TINY[kind])
    ldm = random_ldm_state_dict(vae)
    assert_parity(save_ldm(ldm, tmp_path / "vae.safetensors"), vae, images((2, 48, 80, 3), seed=1))


def test_full_size_sd_forward_parity(tmp_path):
    vae = make_torch_vae(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, weight_std=None
    )
    vae.save_pretrained(tmp_path / "sd")
    assert_parity(tmp_path / "sd", vae, images((1, 64, 64, 3), seed=2))
