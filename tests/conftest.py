"""Shared test fixtures: tiny model configs and deterministic inputs."""

import numpy as np
import pytest

from sigmavae_jax.config import ModelConfig


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """An SD-like f4 model small enough for many CPU forward passes."""
    return ModelConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8)


def images(shape, seed=0) -> np.ndarray:
    """Uniform [-1, 1] float32 images of `shape` (B, H, W, C)."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)
