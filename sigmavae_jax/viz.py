"""Pictures for people: reconstruction grids (more figures arrive with the eval issue)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(..., H, W, C) floats in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruction_grid(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Each entry of `rows` is a batch (B, H, W, C) in [-1, 1]; rows are stacked, each
    shows its B images side by side with `gap` white pixels between. -> (R*H', B*W', C) uint8."""
    rows = [to_uint8(r) for r in rows]
    b, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + gap) - gap, b * (w + gap) - gap, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    return grid


def save_png(path: str | pathlib.Path, image: np.ndarray) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
    return path


def robustness_figure(path: str | pathlib.Path, curves: dict[str, list[dict[str, float]]]) -> pathlib.Path:
    """PSNR (and LPIPS, when measured) against the latent noise sigma, one line per model.

    curves: model name -> the rows of `evaluate.robustness` ({"sigma", "psnr", "lpips"})."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    with_lpips = all(row["lpips"] is not None for rows in curves.values() for row in rows)
    figure, axes = plt.subplots(1, 2 if with_lpips else 1, figsize=(10 if with_lpips else 5, 4), squeeze=False)
    for name, rows in curves.items():
        sigmas = [row["sigma"] for row in rows]
        axes[0, 0].plot(sigmas, [row["psnr"] for row in rows], marker="o", label=name)
        if with_lpips:
            axes[0, 1].plot(sigmas, [row["lpips"] for row in rows], marker="o", label=name)
    axes[0, 0].set(xlabel="latent noise sigma (x latent std)", ylabel="PSNR (dB)", title="reconstruction under latent noise")
    if with_lpips:
        axes[0, 1].set(xlabel="latent noise sigma (x latent std)", ylabel="LPIPS", title="perceptual distance")
    for axis in axes.ravel():
        axis.grid(alpha=0.3)
        axis.legend()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
