"""PSNR against scikit-image on real sample photos with several distortions."""

import numpy as np
import pytest
from skimage import data, filters
from skimage.metrics import peak_signal_noise_ratio

from sigmavae_jax import metrics


def distortions(image: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "noise": image + rng.normal(0, 0.05, image.shape),  # goes outside [0, 1]: clipped
        "blur": filters.gaussian(image, sigma=1.5, channel_axis=-1),
        "shift": np.clip(image * 0.9 + 0.05, 0, 1),
    }


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_psnr_matches_skimage(name):
    image = getattr(data, name)().astype(np.float64) / 255.0
    if image.ndim == 2:
        image = image[..., None]
    for kind, distorted in distortions(image).items():
        want = peak_signal_noise_ratio(np.clip(image, 0, 1), np.clip(distorted, 0, 1), data_range=1.0)
        got = metrics.psnr(image[None].astype(np.float32), distorted[None].astype(np.float32))
        np.testing.assert_allclose(float(got[0]), want, atol=1e-4, err_msg=kind)
