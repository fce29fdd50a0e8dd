"""The kernel sets compute the written maths: each CPU form and the XLA forms against plain lax,
values and gradients, and `select` follows the devices, not the host."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigmavae_jax import kernels
from sigmavae_jax.models import layers


def _same_conv_reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _nearest_then_conv(x, kernel):
    """The written form, independently: repeat rows and columns, then a padded 3x3 conv."""
    return _same_conv_reference(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), kernel)


@pytest.mark.parametrize("upsampled_conv", [kernels.upsampled_conv, kernels.cpu_upsampled_conv])
def test_upsampled_conv_equals_nearest_upsample_then_conv_with_gradients(upsampled_conv):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)  # odd sizes: every border phase
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 10, 14, 4)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        reference = _nearest_then_conv(x, kernel)
        np.testing.assert_allclose(np.asarray(upsampled_conv(x, kernel)), np.asarray(reference), atol=1e-5)
        ours = jax.vjp(upsampled_conv, x, kernel)[1](cotangent)
        written = jax.vjp(_nearest_then_conv, x, kernel)[1](cotangent)
    for got, want in zip(ours, written):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("along", ["both", "input", "kernel"])
def test_xla_upsampled_conv_forward_mode_equals_the_written_forms(along):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
    dx = jnp.asarray(rng.normal(size=x.shape), jnp.float32) if along != "kernel" else jnp.zeros_like(x)
    dkernel = jnp.asarray(rng.normal(size=kernel.shape), jnp.float32) if along != "input" else jnp.zeros_like(kernel)
    with jax.default_matmul_precision("highest"):
        if along == "input":  # the kernel closed over: its tangent is a symbolic zero
            got = jax.jvp(lambda x: kernels.upsampled_conv(x, kernel), (x,), (dx,))
        elif along == "kernel":
            got = jax.jvp(lambda k: kernels.upsampled_conv(x, k), (kernel,), (dkernel,))
        else:
            got = jax.jvp(kernels.upsampled_conv, (x, kernel), (dx, dkernel))
        want = jax.jvp(_nearest_then_conv, (x, kernel), (dx, dkernel))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4)


def test_upsampled_conv_compiled_for_a_tpu_reverses_no_image_for_its_kernel_gradient():
    from sigmavae_jax import topology

    device = topology.slice_devices(topology.parse_slice("v5e:1x1"))[0]
    one_chip = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((2, 16, 16, 128), jnp.bfloat16, sharding=one_chip)
    kernel = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.bfloat16, sharding=one_chip)
    grads = jax.jit(
        jax.grad(lambda x, k: jnp.mean(jnp.abs(kernels.upsampled_conv(x, k).astype(jnp.float32))), argnums=(0, 1))
    )
    program = grads.lower(x, kernel).compile().as_text()
    reversed_shapes = re.findall(r"= \w+\[([\d,]+)\]\S* reverse\(", program)
    # (lax's own rule for the kernel makes libtpu reverse the cotangent, bf16[2,32,32,128], here)
    assert all(shape.startswith("4,4,") for shape in reversed_shapes), reversed_shapes


@pytest.mark.parametrize(
    "pixels", [10**9, 3 * 11 * 9, 8 * 9]
)  # one piece; batch of 11-row pieces (ragged); single images
def test_conv3x3_gradients_summed_over_pieces_equal_the_whole_conv(monkeypatch, pixels):
    monkeypatch.setattr(kernels, "KERNEL_GRAD_PIXELS", pixels)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 20, 9, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(3, 20, 9, 4)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        ours = jax.vjp(kernels.conv3x3, x, kernel)
        reference = jax.vjp(_same_conv_reference, x, kernel)
        np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(reference[0]), atol=1e-5)
        for got, want in zip(ours[1](cotangent), reference[1](cotangent)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_kernel_grad_pieces_cover_the_batch_and_bound_the_piece_count():
    for batch, height, width in [(2, 128, 128), (1, 256, 256), (8, 256, 256), (2, 16, 16), (4, 4096, 4096)]:
        images, rows = kernels.kernel_grad_pieces(batch, height, width)
        assert 1 <= images <= batch and 1 <= rows <= height
        pieces = -(-batch // images) * -(-height // rows)
        assert pieces <= kernels.KERNEL_GRAD_MAX_PIECES or rows == 8, (batch, height, width, images, rows)
    assert kernels.kernel_grad_pieces(2, 16, 16) == (2, 16)  # small tensors stay whole
    assert kernels.kernel_grad_pieces(2, 128, 128) == (2, 32)


@pytest.mark.parametrize("chosen, route", [(kernels.CPU, {1: "dot_general", 3: "conv3x3"}), (kernels.XLA, {})])
def test_model_convs_match_flax_conv_and_lower_to_their_kernels(chosen, route):
    from flax import nnx

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.float32)
    for size, stride, padding in [(1, 1, [(0, 0), (0, 0)]), (3, 1, [(1, 1), (1, 1)]), (3, 2, [(0, 1), (0, 1)])]:
        ours = layers.conv(
            6, 4, size, stride=stride, padding=padding, dtype=jnp.float32, kernels=chosen, rngs=nnx.Rngs(0)
        )
        flax_conv = nnx.Conv(6, 4, (size, size), strides=stride, padding=padding, rngs=nnx.Rngs(0))
        jaxpr = str(jax.make_jaxpr(ours)(x))
        # the strided conv is lax's own in both sets; the CPU set routes 1x1 and 3x3 'same' convs
        assert route.get(size if stride == 1 else None, "conv_general_dilated") in jaxpr
        if chosen is kernels.XLA:
            assert "custom_vjp" not in jaxpr and "dot_general" not in jaxpr
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(flax_conv(x)), rtol=1e-5, atol=1e-5)


class _Device:
    def __init__(self, platform):
        self.platform = platform


def test_select_follows_the_devices_not_the_host():
    assert kernels.select("auto", jax.devices()) is kernels.CPU  # the test host's CPU devices
    assert kernels.select("auto", [_Device("tpu")] * 4) is kernels.XLA
    assert kernels.select("auto", [_Device("gpu")] * 8) is kernels.GPU
    assert kernels.select("auto", [_Device("gpu"), _Device("tpu")]) is kernels.XLA
    assert kernels.select("xla", jax.devices()) is kernels.XLA
    assert kernels.select("gpu", [_Device("tpu")]) is kernels.GPU
    assert kernels.select("cpu", [_Device("tpu")]) is kernels.CPU
    with pytest.raises(ValueError, match="'fast' unknown.*auto"):
        kernels.select("fast", jax.devices())


@pytest.mark.parametrize("cond", [kernels.select_cond, kernels.lax_cond])
def test_cond_returns_the_taken_branch_and_hides_the_other(cond):
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    x, kernel = jnp.ones((1, 4, 4, 2)), jnp.full((3, 3, 2, 3), 0.5)

    def compute():  # a kernel gradient, as in the discriminator's branch, and a value that is
        grad = jax.grad(lambda k: jnp.sum(conv(x, k) ** 2))(kernel)  # NaN when not taken below
        return grad, jnp.log(jnp.sum(grad) - 1e6)

    def otherwise():
        return jnp.zeros_like(kernel), jnp.zeros(())

    run = jax.jit(lambda active: cond(active, compute, otherwise))
    program = run.lower(True).as_text()
    assert (program.count("stablehlo.case") + program.count("stablehlo.if") > 0) == (cond is kernels.lax_cond)
    grad, value = run(True)
    np.testing.assert_allclose(
        np.asarray(grad), np.asarray(jax.grad(lambda k: jnp.sum(conv(x, k) ** 2))(kernel)), rtol=1e-6
    )
    assert np.isnan(value)  # log of a negative number: the taken branch is returned as is
    grad, value = run(False)
    assert not np.any(grad) and value == 0.0


def test_forward_mode_passes_through_encode_and_decode_with_xla_kernels(tiny_cfg):
    from sigmavae_jax import api

    model = api.build_model(tiny_cfg, kernels="xla")
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    direction = jnp.ones_like(x)
    z, dz = jax.jvp(model.encode, (x,), (direction,))
    eps = 1e-2
    with jax.default_matmul_precision("highest"):
        finite = (model.encode(x + eps * direction) - model.encode(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(dz), np.asarray(finite), rtol=2e-2, atol=2e-3)
    image, d_image = jax.jvp(model.decode, (z,), (dz,))
    assert image.shape == (1, 16, 16, 3) and np.all(np.isfinite(np.asarray(d_image)))


def _perturbed_resnet_block(chosen, dtype, channels_in, channels_out):
    """(graph, state) of a ResnetBlock whose parameters are moved off their initial values
    (GroupNorm scales and biases away from 1 and 0), the same for every kernel set."""
    from flax import nnx

    block = layers.ResnetBlock(channels_in, channels_out, groups=4, dtype=dtype, kernels=chosen, rngs=nnx.Rngs(0))
    assert block.written_backward == chosen.written_block_backward
    graph, state = nnx.split(block)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(7)
    return graph, jax.tree.unflatten(tree, [a + 0.3 * rng.normal(size=a.shape).astype(a.dtype) for a in leaves])


def test_gpu_kernels_are_xlas_with_autodiffs_block_backward():
    assert kernels.GPU.name == "gpu" and not kernels.GPU.written_block_backward and kernels.XLA.written_block_backward
    assert dataclasses.replace(kernels.GPU, name="xla", written_block_backward=True) == kernels.XLA


@pytest.mark.parametrize("channels_in, channels_out", [(8, 8), (8, 16)])
def test_written_block_backward_equals_autodiff_in_both_modes(channels_in, channels_out):
    """The XLA kernels' ResnetBlock (`resnet_branch`) against the same block differentiated by
    autodiff through flax's GroupNorm and conv, float32: values, reverse mode (also under a
    user's jax.checkpoint) and forward mode."""
    from flax import nnx

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 12, 10, channels_in)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 12, 10, channels_out)), jnp.float32)
    results = {}
    for chosen in (kernels.XLA, kernels.GPU):  # written and autodiff's block backward
        graph, state = _perturbed_resnet_block(chosen, jnp.float32, channels_in, channels_out)
        tangents = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), (state, x))

        def loss(state, x):
            return jnp.sum(nnx.merge(graph, state)(x) * weights)

        with jax.default_matmul_precision("highest"):
            results[chosen.written_block_backward] = (
                nnx.merge(graph, state)(x),
                jax.grad(loss, argnums=(0, 1))(state, x),
                jax.grad(jax.checkpoint(loss), argnums=(0, 1))(state, x),
                jax.jvp(lambda s, x: nnx.merge(graph, s)(x), (state, x), tangents)[1],
            )
    for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)


def test_written_block_backward_moves_fewer_bytes_compiled_for_a_tpu():
    """Compiled for one v5e chip in bf16 at 8 images, a ResnetBlock's forward and backward reads
    and writes at least half an activation fewer with the written backward than with
    autodiff's: the second GroupNorm's input gradient is not written out (docs/performance.md
    has the figures per block size)."""
    from flax import nnx

    from sigmavae_jax import dry_run, topology

    one_chip = jax.sharding.SingleDeviceSharding(topology.slice_devices(topology.parse_slice("v5e:1x1"))[0])
    x = jax.ShapeDtypeStruct((8, 32, 32, 256), jnp.bfloat16, sharding=one_chip)
    moved = {}
    for chosen in (kernels.XLA, kernels.GPU):  # written and autodiff's block backward
        graph, state = nnx.split(
            layers.ResnetBlock(256, 256, groups=32, dtype=jnp.bfloat16, kernels=chosen, rngs=nnx.Rngs(0))
        )
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_chip), state)

        def loss(state, x):
            return jnp.mean(jnp.abs(nnx.merge(graph, state)(x).astype(jnp.float32)))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
        moved[chosen.written_block_backward] = dry_run.cost_of(compiled)["bytes accessed"]
    activation = 8 * 32 * 32 * 256 * 2
    assert moved[False] - moved[True] >= 0.5 * activation, (moved, activation)
