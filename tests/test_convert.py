"""The PyTorch-weights converter: keys, shapes, values, round trips and errors.

Sources are independent of the converter: the LDM key names and shapes are written out
below from the LDM architecture, filled with random values (GroupNorm weights too, so no
transposition mistake can hide behind ones and zeros), and turned into a torch diffusers
AutoencoderKL by diffusers' own `convert_ldm_vae_checkpoint` + strict `load_state_dict`.
The LDM file and the diffusers folder therefore hold the same weights by diffusers' word.
Numerical parity of the model outputs is tested in test_model_parity.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import subprocess
import sys
import warnings

import diffusers  # noqa: E402
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from torch_reference import ldm_shapes  # noqa: E402

import sigmavae_jax
from sigmavae_jax import api
from sigmavae_jax.checkpoint import load_params
from sigmavae_jax.config import ModelConfig
from sigmavae_jax.convert import (
    ConversionError,
    ConversionWarning,
    convert,
    keymaps,
    load_torch_weights,
    to_diffusers_state_dict,
    to_ldm_state_dict,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1)


# ---------------------------------------------------------------------------------------
# Independent sources.


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in sorted(shapes.items())}


def expected_params(ldm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What our params must be, keyed "encoder/down/0/block/0/conv1/kernel": the spec's
    transposes applied to the LDM tensors."""
    out = {}
    for key, value in ldm.items():
        *parents, leaf = key.split(".")
        if leaf == "weight" and value.ndim == 4 and parents[-1] in ("q", "k", "v", "proj_out"):
            out["/".join([*parents, "kernel"])] = value[:, :, 0, 0].T
        elif leaf == "weight" and value.ndim == 4:
            out["/".join([*parents, "kernel"])] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight":
            out["/".join([*parents, "scale"])] = value
        else:
            out["/".join([*parents, leaf])] = value
    return out


def assert_params_equal(params, ldm):
    flat = {"/".join(map(str, p)): v for p, v in api.flatten_params(params).items()}
    want = expected_params(ldm)
    assert sorted(flat) == sorted(want)
    for key, value in want.items():
        assert flat[key].dtype == np.float32, key
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


@dataclasses.dataclass(frozen=True)
class Source:
    ldm: dict[str, np.ndarray]  # the LDM state dict (float32)
    ldm_file: pathlib.Path  # it, as safetensors
    diffusers_dir: pathlib.Path  # the same weights as a diffusers folder
    model: torch.nn.Module  # the torch diffusers AutoencoderKL
    config: ModelConfig  # the truth for the diffusers folder


def make_source(root: pathlib.Path, name: str, *, z, quant, groups, scaling, shift, seed) -> Source:
    ldm = random_state(ldm_shapes(**TINY, z=z, quant=quant), seed)
    dconfig = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=z,
        norm_num_groups=groups,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        scaling_factor=scaling,
        shift_factor=shift,
    )
    state = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, dconfig)
    model = diffusers.AutoencoderKL(**dconfig)
    model.load_state_dict(state, strict=True)  # every diffusers parameter comes from `ldm`
    model.save_pretrained(root / f"{name}_diffusers")
    safetensors.numpy.save_file(ldm, str(root / f"{name}_ldm.safetensors"))
    config = ModelConfig(
        **TINY,
        z_channels=z,
        norm_groups=groups,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        scaling_factor=scaling,
        shift_factor=shift or 0.0,
    )
    return Source(ldm, root / f"{name}_ldm.safetensors", root / f"{name}_diffusers", model, config)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Source:
    """z=4 with quant convs, GroupNorm(8), scaling 0.5, no shift."""
    root = tmp_path_factory.mktemp("sd")
    return make_source(root, "sd", z=4, quant=True, groups=8, scaling=0.5, shift=None, seed=0)


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Source:
    """z=16 without quant convs, GroupNorm(32), scaling 0.25, shift 0.125."""
    root = tmp_path_factory.mktemp("flux")
    return make_source(root, "flux", z=16, quant=False, groups=32, scaling=0.25, shift=0.125, seed=1)


@contextlib.contextmanager
def no_conversion_warnings():
    """Turns a ConversionWarning into a failure: nothing should have been assumed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        yield


def save_ldm(path: pathlib.Path, state: dict[str, np.ndarray]) -> pathlib.Path:
    safetensors.numpy.save_file(state, str(path))
    return path


# ---------------------------------------------------------------------------------------
# Names.


def test_key_names_match_diffusers_both_ways(sd, flux):
    for source in (sd, flux):
        slots = keymaps.param_slots(source.config)
        names = {keymaps.ldm_to_diffusers(s.ldm_key, 2): s for s in slots}
        state = source.model.state_dict()
        assert set(names) == set(state)
        assert {s.ldm_key for s in slots} == set(source.ldm)
        for name, slot in names.items():
            assert keymaps.diffusers_to_ldm(name, 2) == slot.ldm_key
            assert tuple(state[name].shape) == keymaps.torch_shape(slot.kind, slot.shape, "diffusers")
    old = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
    for diffusers_name, ldm_name in old.items():
        key = f"decoder.mid_block.attentions.0.{diffusers_name}.weight"
        assert keymaps.diffusers_to_ldm(key, 2) == f"decoder.mid.attn_1.{ldm_name}.weight"


# ---------------------------------------------------------------------------------------
# Loading.


def test_ldm_safetensors_loads_with_family_defaults(sd):
    with pytest.warns(ConversionWarning, match="scaling factor cannot be read.*--config sdxl"):
        converted = load_torch_weights(sd.ldm_file)
    assert converted.layout == "ldm"
    assert converted.source_dtypes == ["float32"]
    assert converted.ignored_keys == []
    # No config.json: GroupNorm groups and scaling come from the SD family (configs/sd.yaml).
    assert converted.config.model == ModelConfig(**TINY, z_channels=4, scaling_factor=0.18215)
    assert_params_equal(converted.params, sd.ldm)


def test_diffusers_folders_load(sd, flux):
    for source in (sd, flux):
        with no_conversion_warnings():
            converted = load_torch_weights(source.diffusers_dir)
        assert converted.layout == "diffusers"
        assert converted.config.model == source.config
        assert_params_equal(converted.params, source.ldm)


def test_diffusers_pipeline_folder_with_vae_subfolder(sd, tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "vae").symlink_to(sd.diffusers_dir)
    converted = load_torch_weights(tmp_path / "pipeline")
    assert converted.config.model == sd.config


def test_ldm_file_with_flux_shapes_gets_flux_defaults(flux):
    with pytest.warns(ConversionWarning, match="FLUX.*nextstep1_f8c16"):
        converted = load_torch_weights(flux.ldm_file)
    model = converted.config.model
    assert (model.z_channels, model.use_quant_conv, model.scaling_factor, model.shift_factor) == (
        16,
        False,
        0.3611,
        0.1159,
    )


@pytest.mark.parametrize("wrapping", ["lightning_ckpt", "ddp_pt"])
def test_torch_checkpoint_wrappers_prefixes_and_ignored_keys(sd, tmp_path, wrapping):
    extra = {
        "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
        "loss.logvar": torch.zeros(()),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4),
    }
    if wrapping == "lightning_ckpt":
        state = {f"first_stage_model.{k}": torch.from_numpy(v) for k, v in sd.ldm.items()}
        path, blob = tmp_path / "sd.ckpt", {"state_dict": {**state, **extra}, "global_step": 7}
    else:
        state = {f"module.{k}": torch.from_numpy(v) for k, v in sd.ldm.items()}
        path, blob = tmp_path / "vae.pt", {"model": {**state, **extra}, "epoch": 3}
    torch.save(blob, path)
    summary = convert(path, tmp_path / "out", config=sd.config)
    assert summary["ignored_keys"] == len(extra)
    assert set(summary["ignored_examples"]) <= set(extra)
    converted = load_torch_weights(path, config=sd.config)
    assert sorted(converted.ignored_keys) == sorted(extra)
    assert_params_equal(converted.params, sd.ldm)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sources_upcast_exactly(sd, tmp_path, fmt, dtype):
    half = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    rounded = {k: v.astype(half) for k, v in sd.ldm.items()}
    if fmt == "safetensors":
        path = save_ldm(tmp_path / "half.safetensors", rounded)
    else:
        path = tmp_path / "half.pt"
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        torch.save({k: torch.from_numpy(v).to(torch_dtype) for k, v in sd.ldm.items()}, path)
    converted = load_torch_weights(path, config=sd.config)
    assert converted.source_dtypes == [dtype]
    assert_params_equal(converted.params, {k: v.astype(np.float32) for k, v in rounded.items()})


def test_nextstep_folder_conventions_come_from_its_config_json(flux, tmp_path):
    folder = tmp_path / "NextStep-1-f8ch16-Tokenizer"
    folder.mkdir()
    side = {
        "resolution": 256, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2],
        "num_res_blocks": 1, "z_channels": 16, "scaling_factor": 1.0, "shift_factor": 0.0,
        "deterministic": True, "encoder_norm": True, "psz": 2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(side))
    torch.save({k: torch.from_numpy(v) for k, v in flux.ldm.items()}, folder / "checkpoint.pt")
    with no_conversion_warnings():
        converted = load_torch_weights(folder)
    model = converted.config.model
    assert (model.posterior, model.latent_norm, model.latent_norm_patch) == (
        "deterministic",
        "patch_layernorm",
        2,
    )
    assert (model.scaling_factor, model.shift_factor, model.z_channels) == (1.0, 0.0, 16)
    assert_params_equal(converted.params, flux.ldm)

    (folder / "config.json").write_text(json.dumps({**side, "z_channels": 4}))
    with pytest.raises(ConversionError, match=r"disagrees with the weights(.|\n)*z_channels\s+4\s+16"):
        load_torch_weights(folder)


# ---------------------------------------------------------------------------------------
# Errors.


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda s: _drop(s, "encoder.down.0.block.0.norm1.weight"),
            r"1 missing: encoder\.down\.0\.block\.0\.norm1\.weight expected \(32,\)$",
        ),
        (
            lambda s: {**s, "decoder.mid.block_1.conv1.bias": np.zeros(63, np.float32)},
            r"1 mis-shaped: decoder\.mid\.block_1\.conv1\.bias got \(63,\) instead of \(64,\)$",
        ),
        (
            lambda s: {**s, "encoder.down.1.attn.0.q.weight": np.zeros((64, 64, 1, 1), np.float32)},
            r"1 unexpected: encoder\.down\.1\.attn\.0\.q\.weight \(64, 64, 1, 1\)\. .*not supported",
        ),
        (
            lambda s: {k: v for k, v in s.items() if not k.startswith("decoder.up.")},
            r"\d+ missing: [^;]+ expected \([^;]+ and \d+ more$",
        ),
    ],
    ids=["missing", "mis-shaped", "unexpected-down-attention", "truncated-listing"],
)
def test_key_problems_are_listed_with_expected_shapes(sd, tmp_path, edit, expected):
    path = save_ldm(tmp_path / "broken.safetensors", edit(dict(sd.ldm)))
    with pytest.raises(ConversionError, match=expected) as info:
        load_torch_weights(path, config=sd.config)
    assert "\n" not in str(info.value)  # one line, however many keys are wrong


def test_key_problems_in_diffusers_files_use_diffusers_names(sd, tmp_path):
    state = {k: v.numpy() for k, v in sd.model.state_dict().items()}
    path = save_ldm(tmp_path / "d.safetensors", _drop(state, "decoder.up_blocks.0.upsamplers.0.conv.weight"))
    with pytest.raises(
        ConversionError,
        match=r"decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight expected \(64, 64, 3, 3\)",
    ):
        load_torch_weights(path, config=sd.config)


def test_unreadable_sources_name_the_file(sd, tmp_path):
    blob = sd.ldm_file.read_bytes()
    truncated_st = tmp_path / "cut.safetensors"
    truncated_st.write_bytes(blob[: len(blob) // 2])
    truncated_pt = tmp_path / "cut.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.ldm.items()}, tmp_path / "full.pt")
    truncated_pt.write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    for path in (truncated_st, truncated_pt):
        with pytest.raises(ConversionError, match=rf"{path}: .*truncated or corrupt"):
            load_torch_weights(path)
    with pytest.raises(ConversionError, match="no such file or folder"):
        load_torch_weights(tmp_path / "nothing.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConversionError, match="folder without VAE weights"):
        load_torch_weights(tmp_path / "empty_dir")
    pickled = tmp_path / "objects.ckpt"
    torch.save(
        {"state_dict": {"encoder.conv_in.bias": torch.zeros(2)}, "args": argparse.Namespace()},
        pickled,
    )
    with pytest.raises(ConversionError, match=r"Python objects besides tensors.*safetensors") as info:
        load_torch_weights(pickled)
    assert "\n" not in str(info.value)


def test_torch_files_without_torch_say_how_to_install_it(sd, tmp_path, monkeypatch):
    path = tmp_path / "vae.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.ldm.items()}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ConversionError, match=r"needs PyTorch(.|\n)*pip install 'sigmavae_jax\[torch\]'"):
        load_torch_weights(path)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["unet.conv_in.weight", "text.fc.weight"], r"no VAE tensors found(.|\n)*unet\.\* \(1\)"),
        (["vae.encoder.conv_in.weight", "encoder.conv_in.weight"], "several prefixes"),
        (
            ["encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"],
            "mixes",
        ),
    ],
    ids=["no-vae", "two-prefixes", "mixed-layouts"],
)
def test_ambiguous_state_dicts_are_refused(names, expected):
    with pytest.raises(ConversionError, match=expected):
        keymaps.detect_layout(keymaps.select_vae_keys(names).names)


def test_config_mismatch_names_fields(flux):
    with pytest.raises(
        ConversionError,
        match=r"--config sd(.|\n)*z_channels\s+4\s+16(.|\n)*use_quant_conv\s+True\s+False",
    ):
        load_torch_weights(flux.ldm_file, config="sd")


def test_output_is_never_overwritten(sd, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert(sd.ldm_file, tmp_path / "taken")
    with pytest.raises(ConversionError, match="exists"):
        convert(sd.ldm_file, sd.ldm_file, to="ldm")


# ---------------------------------------------------------------------------------------
# Round trips (bit-exact in float32).


def _assert_state_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_ldm_round_trip_through_jax_export(sd, tmp_path):
    convert(sd.ldm_file, tmp_path / "export", config=sd.config)
    params, config = load_params(tmp_path / "export")
    assert config.model == sd.config
    _assert_state_equal(to_ldm_state_dict(params, config.model), sd.ldm)
    codec = sigmavae_jax.load(tmp_path / "export")
    assert codec.encode(np.zeros((1, 8, 8, 3), np.float32)).shape == (1, 4, 4, 4)


def test_diffusers_round_trip_through_jax_export(sd, tmp_path):
    convert(sd.diffusers_dir, tmp_path / "export")
    params, config = load_params(tmp_path / "export")
    original = {k: v.numpy() for k, v in sd.model.state_dict().items()}
    _assert_state_equal(to_diffusers_state_dict(params, config.model), original)

    convert(tmp_path / "export", tmp_path / "back", to="diffusers")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back")
    _assert_state_equal({k: v.numpy() for k, v in reloaded.state_dict().items()}, original)
    for field in ("block_out_channels", "norm_num_groups", "scaling_factor", "use_quant_conv"):
        assert tuple(np.atleast_1d(reloaded.config[field])) == tuple(np.atleast_1d(sd.model.config[field]))


def test_to_ldm_file_equals_source_and_converts_back(flux, tmp_path):
    out = tmp_path / "vae.safetensors"
    convert(flux.diffusers_dir, out, to="ldm")
    _assert_state_equal(safetensors.numpy.load_file(str(out)), flux.ldm)
    with no_conversion_warnings():  # the embedded config restores groups and scaling
        assert load_torch_weights(out).config.model == flux.config


def test_bfloat16_output(sd, tmp_path):
    convert(sd.ldm_file, tmp_path / "bf16", config=sd.config, dtype="bfloat16")
    params, _ = load_params(tmp_path / "bf16")
    flat = {"/".join(map(str, p)): v for p, v in api.flatten_params(params).items()}
    for key, value in expected_params(sd.ldm).items():
        assert flat[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(flat[key]), value.astype(ml_dtypes.bfloat16), err_msg=key)


def test_diffusers_export_warns_about_nextstep_conventions(flux, tmp_path):
    nextstep = flux.config.model_copy(update={"posterior": "deterministic", "latent_norm": "patch_layernorm"})
    with pytest.warns(ConversionWarning, match="cannot represent the latent normalisation"):
        convert(flux.ldm_file, tmp_path / "d", config=nextstep, to="diffusers")


# ---------------------------------------------------------------------------------------
# The command line, in a fresh process.


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_converts_and_explains_errors(sd, tmp_path):
    done = _run("convert_torch_weights.py", str(sd.ldm_file), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "layout        ldm" in done.stdout
    assert "z_channels=4" in done.stdout and str(tmp_path / "out") in done.stdout
    assert "warning: the latent scaling factor cannot be read" in done.stderr
    assert sigmavae_jax.load(tmp_path / "out").model_config.z_channels == 4

    failed = _run("convert_torch_weights.py", str(tmp_path / "missing.ckpt"), str(tmp_path / "out2"))
    assert failed.returncode == 2  # bad input, as in eval.py and train.py
    assert "error:" in failed.stderr and "missing.ckpt" in failed.stderr
    assert "Traceback" not in failed.stderr

    helped = _run("convert_torch_weights.py", "--help")
    assert helped.returncode == 0
    for example in (
        ".ckpt",
        "sdxl_vae.safetensors",
        "ae.safetensors",
        "NextStep-1",
        "--to diffusers",
    ):
        assert example in helped.stdout


def test_safetensors_are_read_without_torch(sd):
    code = (
        "import sys; from sigmavae_jax.convert import load_torch_weights; "
        f"load_torch_weights({str(sd.ldm_file)!r}); "
        "print('torch' in sys.modules)"
    )
    done = _run("-W", "ignore", "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
