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
