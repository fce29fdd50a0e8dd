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
            # torch BatchNorm2d: momentum 0.1 (flax: 0.9), eps 1e-5, statistics in float32
            return nnx.BatchNorm(
                c,
                momentum=0.9,
                epsilon=1e-5,
                dtype=jnp.float32,
                scale_init=_bn_scale_init,
                use_fast_variance=False,
                rngs=rngs,
            )

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
            h = norm(h.astype(jnp.float32), use_running_average=use_running_average).astype(h.dtype)
            h = nnx.leaky_relu(h, 0.2)
        return self.conv_out(h).astype(jnp.float32)
