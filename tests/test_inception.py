"""FID Inception-v3: against an independent torch implementation (torch-fidelity's), the input
stage against torch's interpolate, the FID-specific pools, weight files and the converter.

No pretrained weights are available offline, so the comparisons use random weights with
pytorch-fid's key names and shapes: the structure is what is under test, and random weights
exercise every branch at least as hard as the real ones.

torch-fidelity is a test dependency (installed `--no-deps`, like pytorch-fid): its package
`__init__` needs torchvision, which does not import here, so only its
`feature_extractor_inceptionv3` module is loaded, under a bare package.
"""

import importlib
import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from sigmavae_jax.convert.errors import ConversionError
from sigmavae_jax.convert.inception_torch import (
    convert_inception_torch,
    inception_arrays_from_torch,
    torch_inception_shapes,
)
from sigmavae_jax.models.inception import (
    FEATURE_DIM,
    INPUT_SIZE,
    FIDInception,
    InceptionWeight,
    avg_pool_3x3_exclude_pad,
    check_inception_weights,
    fid_preprocess,
    inception_weight_shapes,
    load_inception,
    max_pool_3x3,
    read_inception_weights,
    save_inception_weights,
)

RTOL = 1e-4  # features: max |ours - torch| / max |torch|


def _load_torch_fidelity_inception() -> types.ModuleType:
    """torch-fidelity's feature_extractor_inceptionv3 module, without its package __init__."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")  # locates it; does not run __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "torch-fidelity is a test dependency: pip install --no-deps torch-fidelity "
            "(its torchvision dependency must stay out)"
        )
    pkg_dir = list(spec.submodule_search_locations)[0]
    bare = importlib.util.spec_from_file_location(
        "torch_fidelity",
        pathlib.Path(pkg_dir) / "__init__.py",
        submodule_search_locations=[pkg_dir],
    )
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(bare)  # not executed
    return importlib.import_module(name)


def random_torch_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with pytorch-fid's keys and shapes and O(1) activations throughout.

    He-scaled kernels keep the ReLU chain's scale; BatchNorm statistics near (0, 1) with
    positive variances; the batch counters are there, as in torch-saved Inception files.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in torch_inception_shapes(include_fc=True).items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif key.endswith(("bn.weight", "running_var")):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "running_mean")):
            value = rng.normal(0.0, 0.1, shape)
        else:  # fc: unused by the features, but a strict load_state_dict wants it
            value = rng.normal(0.0, 0.01, shape)
        state[key] = torch.from_numpy(value.astype(np.float32))
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state


@pytest.fixture(scope="module")
def torch_pth(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_torch_state(), path)
    return path


@pytest.fixture(scope="module")
def weights_file(torch_pth) -> pathlib.Path:
    return convert_inception_torch(torch_pth, torch_pth.with_name("inception.npz"))


@pytest.fixture(scope="module")
def model(weights_file) -> FIDInception:
    return load_inception(weights_file)


@pytest.fixture(scope="module")
def tf_module() -> types.ModuleType:
    return _load_torch_fidelity_inception()


@pytest.fixture(scope="module")
def torch_net(tf_module, torch_pth):
    torch.set_num_threads(2)
    net = tf_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(torch_pth)
    )
    return net.eval()


def torch_body(net, x_nchw: torch.Tensor) -> np.ndarray:
    """torch-fidelity's forward after its input stage (TF1 resize, (x - 128) / 128): the same
    layers in the same order, fed an already normalised tensor. (B, 3, H, W) -> (B, 2048)."""
    with torch.no_grad():
        x = x_nchw
        for layer in (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
            "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
            "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
            "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
            "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
        ):  # fmt: skip
            x = getattr(net, layer)(x)
        return torch.flatten(x, 1).numpy()


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@nnx.jit
def jit_body(m: FIDInception, x: jax.Array) -> jax.Array:
    return m.features_from_normalized(x)


@nnx.jit
def jit_features(m: FIDInception, x: jax.Array) -> jax.Array:
    return m(x)


@pytest.fixture(scope="module")
def normalized_input() -> np.ndarray:
    """(2, 299, 299, 3) in [-1, 1]: one smooth image (pools see structure) and one noisy."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE] / INPUT_SIZE
    smooth = np.stack([np.sin(6 * xx), np.cos(4 * yy), np.sin(5 * (xx + yy))], axis=-1)
    noisy = rng.uniform(-1.0, 1.0, (INPUT_SIZE, INPUT_SIZE, 3))
    return np.stack([smooth, noisy]).astype(np.float32)


@pytest.fixture(scope="module")
def body_outputs(model, torch_net, normalized_input):
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jit_body(model, jnp.asarray(normalized_input)))
    ref = torch_body(torch_net, torch.from_numpy(normalized_input.transpose(0, 3, 1, 2)))
    return ours, ref


# --- the network against torch-fidelity's ---------------------------------------------------


def test_body_matches_torch_fidelity(body_outputs):
    ours, ref = body_outputs
    assert ours.shape == ref.shape == (2, FEATURE_DIM)
    assert ours.dtype == np.float32
    assert np.all(np.isfinite(ours))
    # The random weights keep activations O(1) and alive (not all ReLU-dead).
    assert 0.05 < np.mean(np.abs(ref)) < 20 and np.mean(ref > 0) > 0.5
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("piece", ["max pool in Mixed_7c", "count_include_pad=False"])
def test_fid_specific_pools_matter(piece, tf_module, torch_net, normalized_input, body_outputs, monkeypatch):
    """Undo one FID patch in the torch reference: the features move far beyond the tolerance,
    so the match above really checks that patch."""
    real = F

    def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True, **kw):
        # torchvision's unpatched blocks: zero padding counted in the average.
        return real.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True, **kw)

    def max_pool2d(x, kernel_size, stride=None, padding=0, **kw):
        if stride == 1:  # only Mixed_7c's branch_pool max-pools with stride 1: average instead
            return real.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)
        return real.max_pool2d(x, kernel_size, stride, padding, **kw)

    public = {k: getattr(real, k) for k in dir(real) if not k.startswith("_")}
    shim = types.SimpleNamespace(**public)
    if piece == "count_include_pad=False":
        shim.avg_pool2d = avg_pool2d
    else:
        shim.max_pool2d = max_pool2d
    monkeypatch.setattr(tf_module, "F", shim)
    ours, _ = body_outputs
    unpatched = torch_body(torch_net, torch.from_numpy(normalized_input.transpose(0, 3, 1, 2)))
    assert rel_err(ours, unpatched) > 100 * RTOL


def test_end_to_end_matches_pytorch_fid_pipeline(model, torch_net):
    """Our __call__ on [0, 1] images equals pytorch-fid's input stage (F.interpolate bilinear,
    align_corners=False, then 2x - 1) followed by the torch network."""
    x01 = np.random.default_rng(2).uniform(0.0, 1.0, (1, 80, 96, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jit_features(model, jnp.asarray(x01)))
    t = torch.from_numpy(x01.transpose(0, 3, 1, 2))
    t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    ref = torch_body(torch_net, 2 * t - 1)
    assert rel_err(ours, ref) <= RTOL


# --- the input stage and the pools -----------------------------------------------------------


@pytest.mark.parametrize("hw", [(299, 299), (32, 32), (80, 96), (512, 400), (300, 1000)])
def test_preprocess_matches_torch_interpolate(hw):
    """jax.image.resize(bilinear, antialias=False) is torch's align_corners=False bilinear,
    up and down (no antialiasing when shrinking either), and 299x299 passes unchanged."""
    x01 = np.random.default_rng(3).uniform(0.0, 1.0, (2, *hw, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(fid_preprocess)(x01))
    t = torch.from_numpy(x01.transpose(0, 3, 1, 2))
    t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    ref = (2 * t - 1).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (2, INPUT_SIZE, INPUT_SIZE, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_pools_match_torch():
    x = np.random.default_rng(4).normal(size=(2, 9, 8, 5)).astype(np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))

    def nhwc(y):
        return y.numpy().transpose(0, 2, 3, 1)

    avg = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
    np.testing.assert_allclose(avg_pool_3x3_exclude_pad(x), nhwc(avg), atol=1e-6)
    # ... and it is not the plain average on the border
    plain = F.avg_pool2d(t, 3, stride=1, padding=1)
    assert np.max(np.abs(avg_pool_3x3_exclude_pad(x) - nhwc(plain))) > 0.1
    np.testing.assert_array_equal(max_pool_3x3(x, 1, 1), nhwc(F.max_pool2d(t, 3, 1, 1)))
    np.testing.assert_array_equal(max_pool_3x3(x, 2), nhwc(F.max_pool2d(t, 3, 2)))


# --- model, weights, errors --------------------------------------------------------------------


def test_weights_are_frozen_and_round_trip(model, weights_file, tmp_path):
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    frozen = jax.tree.leaves(nnx.state(model, InceptionWeight))
    assert len(frozen) == len(inception_weight_shapes())
    weights = model.weights()
    stored = read_inception_weights(weights_file)
    assert sorted(weights) == sorted(stored) == sorted(inception_weight_shapes())
    for key, value in stored.items():
        np.testing.assert_array_equal(weights[key], value)
    # The other file format holds the same arrays.
    again = read_inception_weights(save_inception_weights(tmp_path / "i.safetensors", weights))
    for key, value in stored.items():
        np.testing.assert_array_equal(again[key], value)

    # Gradients w.r.t. the weights are zero (stop_gradient), even taken over the whole module.
    def total(m, x):
        return m.features_from_normalized(x).sum()

    grads = jax.grad(total)(model, jnp.zeros((1, 75, 75, 3)))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_missing_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_inception(tmp_path / "inception.npz")
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert "pytorch-fid" in message and "releases" in message
    command = "convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth inception.npz"
    assert f"{command} --inception" in message


def test_wrong_suffix_and_bad_inputs(weights_file, model, tmp_path):
    with pytest.raises(ValueError, match=r"\.pth.*convert"):
        load_inception(tmp_path / "pt_inception.pth")
    with pytest.raises(ValueError, match=r"NHWC"):
        model(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match=r"/ 255"):
        model(jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"at least 75x75"):
        model.features_from_normalized(jnp.zeros((1, 64, 64, 3)))


def _numpy_state(seed=0):
    return {k: v.numpy() for k, v in random_torch_state(seed).items() if v.is_floating_point()}


def test_converter_lists_every_key_problem():
    state = _numpy_state()
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    state["Mixed_9z.branch1x1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["Mixed_7c.branch_pool.bn.running_var"] = np.ones((7,), np.float32)
    with pytest.raises(ConversionError) as info:
        inception_arrays_from_torch(state, source="broken.pth")
    message = str(info.value)
    assert "broken.pth" in message
    assert "1 missing keys" in message and "Mixed_6c.branch7x7_2.conv.weight" in message
    assert "1 unexpected keys" in message and "Mixed_9z.branch1x1.conv.weight" in message
    assert "1 mis-shaped" in message and "Mixed_7c.branch_pool.bn.running_var got (7,)" in message


def test_converter_flags_torchvision_imagenet_weights():
    state = _numpy_state()
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ConversionError, match=r"torchvision's ImageNet Inception"):
        inception_arrays_from_torch(state)


def test_converter_layout():
    state = _numpy_state()
    arrays = inception_arrays_from_torch(state)
    assert {k: v.shape for k, v in arrays.items()} == inception_weight_shapes()
    w = state["Mixed_6b.branch7x7_2.conv.weight"]  # (128, 128, 1, 7) OIHW
    np.testing.assert_array_equal(arrays["Mixed_6b.branch7x7_2.conv.kernel"], w.transpose(2, 3, 1, 0))
    for ours, theirs in [("var", "running_var"), ("mean", "running_mean"), ("scale", "weight")]:
        np.testing.assert_array_equal(arrays[f"Conv2d_1a_3x3.bn.{ours}"], state[f"Conv2d_1a_3x3.bn.{theirs}"])


def test_weight_check_lists_every_problem(model):
    arrays = model.weights()
    del arrays["Mixed_5b.branch1x1.bn.mean"]
    arrays["Mixed_7a.branch3x3_1.bn.var"] = -arrays["Mixed_7a.branch3x3_1.bn.var"]
    arrays["Conv2d_1a_3x3.conv.kernel"] = arrays["Conv2d_1a_3x3.conv.kernel"][..., :4]
    arrays["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        check_inception_weights(arrays, source="x.npz")
    message = str(info.value)
    for expected in (
        "x.npz", "Mixed_5b.branch1x1.bn.mean", "extra",
        "Conv2d_1a_3x3.conv.kernel got (3, 3, 3, 4) instead of (3, 3, 3, 32)",
        "negative", "Mixed_7a.branch3x3_1.bn.var", "pt_inception-2015-12-05-6726825d.pth",
    ):  # fmt: skip
        assert expected in message
