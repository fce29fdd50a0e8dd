"""PatchGAN NLayerDiscriminator (pix2pix / taming-transformers), NHWC, Flax NNX.

BatchNorm uses the statistics of the batch it is given. Inside a jit over a sharded batch
that batch is the GLOBAL one: XLA inserts the cross-device reductions, so the statistics
match a single-device run on the same global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sigmavae_jax.config import DiscriminatorConfig

_CONV_INIT = nnx.initializers.normal(0.02)  # reference init: N(0, 0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # reference init: N(1, 0.02)


class BatchNorm2d(nnx.Module):
    """torch's `BatchNorm2d` over the channels of (B, H, W, C), in float32.

    Training mode normalises with the batch's mean and biased variance and moves the running
    statistics as torch does: momentum 0.1, the variance unbiased (times n / (n - 1), n =
    B * H * W). `use_running_average=True` normalises with the running statistics instead and
    leaves them. eps 1e-5. Attributes: `scale`, `bias` (nnx.Param), `mean`, `var`
    (nnx.BatchStat), each (C,) float32; a batch of one pixel (n = 1) has no unbiased variance
    and raises ValueError.
    """

    momentum = 0.1
    epsilon = 1e-5

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(_bn_scale_init(rngs.params(), (channels,)))
        rngs.params()  # unused: flax's BatchNorm, used before, drew a key here, so a seed keeps its draws
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array, *, use_running_average: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.size // x.shape[-1]
            if n < 2:
                raise ValueError(
                    f"BatchNorm2d in training mode needs more than one value per channel, got shape {x.shape}"
                )
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            # set_value, not `[...] =`: flax's indexed assignment asks a traced value for its
            # sharding, and jax answers with an error message that walks the whole trace so far.
            self.mean.set_value((1 - self.momentum) * self.mean[...] + self.momentum * mean)
            self.var.set_value((1 - self.momentum) * self.var[...] + self.momentum * var * (n / (n - 1)))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class NLayerDiscriminator(nnx.Module):
    """(B, H, W, C) image in [-1, 1] -> (B, H', W', 1) patch logits (H' = H/8 - 2 for 3 layers).

    conv4x4/2 -> LeakyReLU(0.2) -> [conv4x4/2 (no bias) -> BN -> LeakyReLU] * (n_layers - 1)
    -> conv4x4/1 (no bias) -> BN -> LeakyReLU -> conv4x4/1 -> 1 channel; padding 1 throughout.
    """

    def __init__(self, cfg: DiscriminatorConfig, *, in_channels: int = 3, rngs: nnx.Rngs, dtype=jnp.float32):
        def conv(cin, cout, stride, bias):
            return nnx.Conv(
                cin,
                cout,
                (4, 4),
                strides=stride,
                padding=[(1, 1), (1, 1)],
                use_bias=bias,
                kernel_init=_CONV_INIT,
                dtype=dtype,
                rngs=rngs,
            )

        def norm(c):
            return BatchNorm2d(c, rngs=rngs)

        ndf = cfg.ndf
        self.conv_in = conv(in_channels, ndf, 2, True)
        convs, norms = [], []
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            convs.append(conv(ndf * prev, ndf * mult, stride, False))
            norms.append(norm(ndf * mult))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = conv(ndf * mult, 1, 1, True)

    def __call__(self, x: jax.Array, *, use_running_average: bool = False) -> jax.Array:
        h = nnx.leaky_relu(self.conv_in(x), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = norm(h, use_running_average=use_running_average).astype(h.dtype)
            h = nnx.leaky_relu(h, 0.2)
        return self.conv_out(h).astype(jnp.float32)
