"""PatchGAN discriminator against a torch NLayerDiscriminator built here from torch.nn."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import images
from flax import nnx
from jax._src.interpreters import partial_eval

from sigmavae_jax.config import DiscriminatorConfig
from sigmavae_jax.models.discriminator import BatchNorm2d, NLayerDiscriminator


def torch_patchgan(ndf, n_layers):
    layers = [torch.nn.Conv2d(3, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [
            torch.nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
            torch.nn.BatchNorm2d(ndf * mult),
            torch.nn.LeakyReLU(0.2),
        ]
    layers.append(torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    return torch.nn.Sequential(*layers)


def test_matches_torch_in_train_mode_with_global_batch_statistics():
    cfg = DiscriminatorConfig(ndf=8, n_layers=3)
    disc = NLayerDiscriminator(cfg, rngs=nnx.Rngs(0))
    net = torch_patchgan(8, 3).train()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    ours = [disc.conv_in, *disc.convs, disc.conv_out]
    with torch.no_grad():
        for theirs, mine in zip(convs, ours):
            theirs.weight.copy_(torch.from_numpy(np.array(mine.kernel[...]).transpose(3, 2, 0, 1)))
            if theirs.bias is not None:
                theirs.bias.copy_(torch.from_numpy(np.array(mine.bias[...])))
        for theirs, mine in zip(norms, disc.norms):
            theirs.weight.copy_(torch.from_numpy(np.array(mine.scale[...])))
            theirs.bias.copy_(torch.from_numpy(np.array(mine.bias[...])))
    x = images((4, 64, 48, 3))
    for step in range(2):  # twice: the running statistics compound as torch's do
        with jax.default_matmul_precision("highest"):
            got = np.asarray(disc(jnp.asarray(x + step)))
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2) + step)).detach().numpy().transpose(0, 2, 3, 1)
        assert got.shape == want.shape == (4, 6, 4, 1)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # momentum 0.1, and the running variance unbiased (n / (n - 1)) as torch keeps it
    for theirs, mine in zip(norms, disc.norms):
        np.testing.assert_allclose(np.asarray(mine.mean[...]), theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(mine.var[...]), theirs.running_var.numpy(), rtol=1e-5)
    # evaluation mode normalises with them and leaves them
    kept = [np.asarray(norm.var[...]) for norm in disc.norms]
    with jax.default_matmul_precision("highest"):
        got = np.asarray(disc(jnp.asarray(x), use_running_average=True))
    want = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-4)
    for before, norm in zip(kept, disc.norms):
        np.testing.assert_array_equal(np.asarray(norm.var[...]), before)


def test_batch_norm_refuses_a_single_value_per_channel_in_training():
    norm = BatchNorm2d(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"more than one value per channel, got shape \(1, 1, 1, 4\)"):
        norm(jnp.ones((1, 1, 1, 4)))
    assert norm(jnp.ones((1, 1, 1, 4)), use_running_average=True).shape == (1, 1, 1, 4)


def test_tracing_a_training_step_never_asks_a_tracer_for_its_origin():
    # The message of a tracer's missing `.sharding` walks the whole trace so far; flax 0.12's
    # BatchNorm asks for it at each update of its running statistics.
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=3), rngs=nnx.Rngs(0))
    graph, params, stats = nnx.split(disc, nnx.Param, nnx.BatchStat)

    def apply(params, stats, x):
        module = nnx.merge(graph, params, stats)
        return module(x), nnx.state(module, nnx.BatchStat)

    asked = AssertionError("a tracer was asked for its origin")
    with mock.patch.object(partial_eval.DynamicJaxprTracer, "_origin_msg", side_effect=asked):
        logits, new_stats = jax.jit(apply)(params, stats, jnp.asarray(images((2, 32, 32, 3))))
    assert logits.shape == (2, 2, 2, 1)
    assert not np.array_equal(
        np.asarray(new_stats["norms"][0]["mean"][...]), np.asarray(stats["norms"][0]["mean"][...])
    )


def test_reference_init():
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=64, n_layers=3), rngs=nnx.Rngs(1))
    kernel = np.asarray(disc.convs[1].kernel[...])
    scale = np.concatenate([np.asarray(n.scale[...]) for n in disc.norms])
    np.testing.assert_allclose(kernel.std(), 0.02, rtol=0.05)
    np.testing.assert_allclose(scale.mean(), 1.0, atol=0.005)
    np.testing.assert_allclose(scale.std(), 0.02, rtol=0.2)
