"""sigmavae_jax: AutoencoderKL with Sigma-VAE noise regularisation in JAX/Flax NNX."""

from sigmavae_jax.api import Codec, build_model, load

__all__ = ["Codec", "build_model", "load"]
