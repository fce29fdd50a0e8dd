"""PSNR and SSIM against scikit-image on real sample photos with several distortions, the
Frechet distance against pytorch-fid's, and exact merging of feature statistics."""

import io
import sys
import types

import numpy as np
import pytest
from PIL import Image
from skimage import data, filters
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sigmavae_jax import metrics


def jpeg(image: np.ndarray, quality: int = 30) -> np.ndarray:
    pixels = np.round(image * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer), np.float64) / 255.0
    return decoded.reshape(image.shape)


def distortions(image: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "noise": image + rng.normal(0, 0.05, image.shape),  # goes outside [0, 1]: clipped
        "blur": filters.gaussian(image, sigma=1.5, channel_axis=-1),
        "jpeg": jpeg(image),
    }


def photo(name: str) -> np.ndarray:
    image = getattr(data, name)().astype(np.float64) / 255.0
    image = image[..., None] if image.ndim == 2 else image
    return image[:192, :256]  # non-square, and keeps the test fast


@pytest.mark.parametrize("name", ["astronaut", "camera"])  # colour and grey
def test_psnr_and_ssim_match_skimage(name):
    image = photo(name)
    for kind, distorted in distortions(image).items():
        a, b = np.clip(image, 0, 1), np.clip(distorted, 0, 1)
        want_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        want_ssim = structural_similarity(a, b, channel_axis=-1, data_range=1.0)
        want_gauss = structural_similarity(
            a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        x, y = image[None].astype(np.float32), distorted[None].astype(np.float32)
        np.testing.assert_allclose(float(metrics.psnr(x, y)[0]), want_psnr, atol=1e-4, err_msg=kind)
        np.testing.assert_allclose(float(metrics.ssim(x, y)[0]), want_ssim, atol=1e-4, err_msg=kind)
        got_gauss = metrics.ssim(x, y, window="gaussian", sample_covariance=False)
        np.testing.assert_allclose(float(got_gauss[0]), want_gauss, atol=1e-4, err_msg=kind)


def test_ssim_is_per_image_and_explains_small_images():
    image = photo("astronaut")
    batch = np.stack([image, np.clip(image + 0.1, 0, 1)]).astype(np.float32)
    values = np.asarray(metrics.ssim(batch, batch[::-1]))
    assert values.shape == (2,) and np.allclose(values[0], values[1])
    assert float(metrics.ssim(batch, batch)[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(batch[:, :5, :5], batch[:, :5, :5])


def pytorch_fid_distance():
    """pytorch-fid's calculate_frechet_distance (numpy + scipy). Its module imports
    torchvision and its Inception at the top, neither of which is needed for this function
    (and torchvision does not import beside this torch): stand-ins take their place."""
    stubs = {
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.transforms": types.ModuleType("torchvision.transforms"),
        "pytorch_fid.inception": types.ModuleType("pytorch_fid.inception"),
    }
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["pytorch_fid.inception"].InceptionV3 = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {2048: 3}})
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return calculate_frechet_distance


def random_stats(rng, dim, samples, shift=0.0):
    features = rng.normal(shift, 1.0, (samples, dim)) @ rng.normal(0, 1.0, (dim, dim)) / np.sqrt(dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("dim, samples", [(16, 200), (64, 1000), (64, 40)])  # the last: singular covariances
def test_frechet_distance_matches_pytorch_fid(dim, samples):
    reference = pytorch_fid_distance()
    rng = np.random.default_rng(dim + samples)
    mu1, s1 = random_stats(rng, dim, samples)
    mu2, s2 = random_stats(rng, dim, samples, shift=0.3)
    want = reference(mu1, s1, mu2, s2)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-6)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_frechet_distance_of_known_gaussians():
    # (mu 0, I) vs (mu 1, 2I) in 3-d: 3 + 3 + 6 - 2 * 3 * sqrt(2)
    got = metrics.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 2 * np.eye(3))
    assert got == pytest.approx(12 - 6 * np.sqrt(2), rel=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_merge_exactly_in_any_split():
    features = np.random.default_rng(0).normal(size=(300, 8))
    whole = metrics.FeatureStats(8).update(features)
    parts = [metrics.FeatureStats(8).update(chunk) for chunk in np.array_split(features, [17, 150, 151])]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    for got, want in zip(merged.mean_cov(), (features.mean(axis=0), np.cov(features, rowvar=False))):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(merged.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        whole.update(np.zeros((2, 7)))
