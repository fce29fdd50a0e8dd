"""Hub names: `sigmavae_jax.load("owner/name")`, its conversion cache, its errors, and the
console commands. No network: the Hub cache is laid out here the way huggingface_hub lays it
out ($HF_HOME/hub/models--owner--name/{refs,snapshots,blobs}) and read with HF_HUB_OFFLINE=1;
answers of the Hub itself (listings, errors) are stood in for at hub.py's seams."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from torch_reference import ldm_shapes, make_torch_vae  # noqa: E402

import sigmavae_jax
from sigmavae_jax import api, hub
from sigmavae_jax.checkpoint import load_params
from sigmavae_jax.convert import convert

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


# ---------------------------------------------------------------------------------------
# Sources and a Hub cache.


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny diffusers VAE folder and a NextStep-1-style folder (config.json + checkpoint.pt
    with LDM keys), with their direct conversions."""
    root = tmp_path_factory.mktemp("sources")
    make_torch_vae(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8).save_pretrained(
        root / "diffusers"
    )
    nextstep = root / "nextstep"
    nextstep.mkdir()
    rng = np.random.default_rng(3)
    state = {
        k: torch.from_numpy(rng.standard_normal(s).astype(np.float32))
        for k, s in ldm_shapes(ch=32, ch_mult=(1, 2), num_res_blocks=1, z=16, quant=False).items()
    }
    torch.save(state, nextstep / "checkpoint.pt")
    (nextstep / "config.json").write_text(
        json.dumps(
            {
                "resolution": 256,
                "in_channels": 3,
                "ch": 32,
                "out_ch": 3,
                "ch_mult": [1, 2],
                "num_res_blocks": 1,
                "z_channels": 16,
                "scaling_factor": 1.0,
                "shift_factor": 0.0,
                "deterministic": True,
                "encoder_norm": True,
                "psz": 2,
            }
        )
    )
    convert(root / "diffusers", root / "diffusers_export")
    convert(nextstep, root / "nextstep_export")
    return {
        "diffusers": root / "diffusers",
        "nextstep": nextstep,
        "diffusers_export": root / "diffusers_export",
        "nextstep_export": root / "nextstep_export",
    }


@pytest.fixture
def hub_env(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh HF_HOME and SIGMAVAE_CACHE, offline. huggingface_hub reads its environment at
    import time, so its constants are set too."""
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SIGMAVAE_CACHE", str(tmp_path / "sigmavae"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hf_home


def put_snapshot(hf_home: pathlib.Path, repo_id: str, commit: str, files: dict[str, pathlib.Path | bytes], ref="main"):
    """Files into the Hub cache as huggingface_hub keeps them: content-addressed blobs, a
    snapshot folder of relative symlinks per commit, refs/<ref> holding the commit hash."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for rel, content in files.items():
        data = content if isinstance(content, bytes) else content.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


def diffusers_files(folder: pathlib.Path, prefix="") -> dict[str, pathlib.Path]:
    return {f"{prefix}{p.name}": p for p in folder.iterdir()}


def assert_same_export(got: pathlib.Path, want: pathlib.Path):
    got_params, got_cfg = load_params(got)
    want_params, want_cfg = load_params(want)
    assert got_cfg.model == want_cfg.model
    got_flat, want_flat = api.flatten_params(got_params), api.flatten_params(want_params)
    assert sorted(got_flat) == sorted(want_flat)
    for key, value in want_flat.items():
        assert np.asarray(got_flat[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(np.asarray(got_flat[key]), np.asarray(value), err_msg=str(key))


@pytest.fixture
def count_conversions(monkeypatch) -> list[pathlib.Path]:
    calls: list[pathlib.Path] = []
    real = hub._convert

    def counted(src, out):
        calls.append(src)
        return real(src, out)

    monkeypatch.setattr(hub, "_convert", counted)
    return calls


def no_conversion(monkeypatch):
    def boom(src, out):
        raise AssertionError(f"converted {src} again")

    monkeypatch.setattr(hub, "_convert", boom)


# ---------------------------------------------------------------------------------------
# Loading and the conversion cache.


def test_repo_converts_once_per_commit_and_matches_direct_conversion(
    sources, hub_env, tmp_path, monkeypatch, count_conversions
):
    put_snapshot(hub_env, "org/tiny-vae", COMMIT_A, diffusers_files(sources["diffusers"]))
    codec = sigmavae_jax.load("org/tiny-vae")
    export = tmp_path / "sigmavae" / "hub" / "org--tiny-vae" / "_root" / COMMIT_A
    assert hub.resolve("org/tiny-vae") == export and len(count_conversions) == 1
    assert_same_export(export, sources["diffusers_export"])
    assert json.loads((export / "hub.json").read_text())["commit"] == COMMIT_A
    assert codec.encode(np.zeros((1, 8, 8, 3), np.float32)).shape == (1, 4, 4, 4)
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    # Again, in a fresh process configured by the environment alone: no conversion, no torch.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, sigmavae_jax, sigmavae_jax.hub as hub\n"
        "def boom(*a): raise AssertionError('converted again')\n"
        "hub._convert = boom\n"
        "codec = sigmavae_jax.load('org/tiny-vae')\n"
        "print(codec.encode(np.zeros((1, 8, 8, 3), np.float32)).shape, hub.resolve('org/tiny-vae'))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["(1,", "4,", "4,", "4)", str(export)]

    # main moves to a new commit: converted anew; the old commit stays loadable by hash.
    put_snapshot(hub_env, "org/tiny-vae", COMMIT_B, diffusers_files(sources["diffusers"]))
    assert hub.resolve("org/tiny-vae") == export.parent / COMMIT_B and len(count_conversions) == 2
    assert hub.resolve("org/tiny-vae", revision=COMMIT_A) == export and len(count_conversions) == 2
    assert hub.resolve(f"org/tiny-vae@{COMMIT_A}") == export and len(count_conversions) == 2


def test_subfolder_and_pipeline_repos(sources, hub_env, tmp_path, monkeypatch, count_conversions):
    files = {
        "model_index.json": b'{"_class_name": "FluxPipeline"}',
        "ae.safetensors": b"not read",  # LDM copy at the root of FLUX repos: the vae/ folder wins
        "transformer/diffusion_pytorch_model.safetensors": b"never fetched",
        **diffusers_files(sources["diffusers"], "vae/"),
    }
    put_snapshot(hub_env, "org/pipe", COMMIT_A, files)
    export = tmp_path / "sigmavae" / "hub" / "org--pipe" / "vae" / COMMIT_A
    assert hub.resolve("org/pipe", subfolder="vae") == export
    assert_same_export(export, sources["diffusers_export"])
    assert hub.resolve("org/pipe/vae") == export and len(count_conversions) == 1
    # no subfolder named: a pipeline repo is read from its vae/ folder (cached under _root)
    assert hub.resolve("org/pipe") == export.parent.parent / "_root" / COMMIT_A
    assert count_conversions[-1].parent.name == "vae"
    with pytest.raises(ValueError, match="give it once"):
        hub.resolve("org/pipe/vae", subfolder="unet")


def test_ldm_checkpoint_pt_repo(sources, hub_env, tmp_path, count_conversions):
    put_snapshot(
        hub_env,
        "stepfun-ai/NextStep-1-f8ch16-Tokenizer",
        COMMIT_A,
        {**diffusers_files(sources["nextstep"]), "README.md": b"# tokenizer"},
    )
    codec = sigmavae_jax.load("stepfun-ai/NextStep-1-f8ch16-Tokenizer", dtype="bfloat16")
    assert codec.model_config.latent_norm == "patch_layernorm"
    assert_same_export(hub.resolve("stepfun-ai/NextStep-1-f8ch16-Tokenizer"), sources["nextstep_export"])
    assert [p.name for p in count_conversions] == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "listing, subfolder, expected",
    [
        (  # stabilityai/sdxl-vae: safetensors over .bin, the diffusers file over the LDM one
            [
                ".gitattributes",
                "README.md",
                "config.json",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors",
                "sdxl_vae.safetensors",
            ],
            None,
            ["diffusion_pytorch_model.safetensors", "config.json"],
        ),
        (  # a FLUX repo: its VAE folder, never the transformer
            [
                "ae.safetensors",
                "flux1-dev.safetensors",
                "model_index.json",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "transformer/diffusion_pytorch_model.safetensors",
            ],
            None,
            ["vae/diffusion_pytorch_model.safetensors", "vae/config.json"],
        ),
        (["config.json", "checkpoint.pt", "README.md"], None, ["checkpoint.pt", "config.json"]),
        (["README.md", "vae.ckpt", "vae.bin.txt"], None, ["vae.ckpt"]),
        (
            ["a/config.json", "a/diffusion_pytorch_model.fp16.safetensors", "a/diffusion_pytorch_model.bin"],
            "a",
            ["a/diffusion_pytorch_model.fp16.safetensors", "a/config.json"],
        ),
    ],
    ids=["sdxl-vae", "flux-pipeline", "nextstep", "single-ckpt", "fp16-subfolder"],
)
def test_only_the_vae_files_are_fetched(listing, subfolder, expected):
    assert hub._pick_files(listing, subfolder, "org/x") == expected


def test_online_fetch_asks_for_the_chosen_files_only(sources, hub_env, monkeypatch, count_conversions):
    put_snapshot(hub_env, "stabilityai/sdxl-vae", COMMIT_A, diffusers_files(sources["diffusers"]))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    listing = [
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
        "sdxl_vae.safetensors",
    ]
    asked = []
    monkeypatch.setattr(
        hub, "_remote_listing", lambda repo, rev: asked.append(("list", repo, rev)) or (COMMIT_A, listing)
    )

    def download(repo, commit, files):
        asked.append(("get", commit, files))
        return hub_env / "hub" / "models--stabilityai--sdxl-vae" / "snapshots" / commit

    monkeypatch.setattr(hub, "_download", download)
    hub.resolve("stabilityai/sdxl-vae@main")
    assert asked == [
        ("list", "stabilityai/sdxl-vae", "main"),
        ("get", COMMIT_A, ["diffusion_pytorch_model.safetensors", "config.json"]),
    ]
    hub.resolve("stabilityai/sdxl-vae@main")  # cached: listed, nothing fetched
    assert asked[-1][0] == "list" and len(count_conversions) == 1


# ---------------------------------------------------------------------------------------
# Errors: one line each, saying what to do.


def _http_error(cls, status):
    return cls(f"{status} Client Error", response=types.SimpleNamespace(headers={}, request=None, status_code=status))


def test_offline_and_uncached_says_so(hub_env):
    with pytest.raises(
        hub.HubError,
        match=r"^org/absent is neither a local path nor in the local Hugging Face cache .*HF_HUB_OFFLINE=1 forbids",
    ) as info:
        sigmavae_jax.load("org/absent")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "where, error, expected",
    [
        (
            "_remote_listing",
            lambda: _http_error(hf_errors.RepositoryNotFoundError, 401),
            r"^org/nope: no such local file or folder, and no Hugging Face repo org/nope \(check the spelling; "
            r"for a private repo log in with `hf auth login`",
        ),
        (
            "_download",
            lambda: _http_error(hf_errors.GatedRepoError, 403),
            r"^org/nope is a gated repo: accept its terms at https://huggingface.co/org/nope "
            r".*then log in with `hf auth login`",
        ),
        (
            "_remote_listing",
            lambda: _http_error(hf_errors.RevisionNotFoundError, 404),
            r"^org/nope has no revision 'v9': use one of its branches",
        ),
        (
            "_remote_listing",
            lambda: ConnectionError("Name or service not known"),
            r"^org/nope is not a local path, the Hugging Face Hub cannot be reached \(ConnectionError: .*"
            r"and org/nope is not in the local cache .*check the network connection",
        ),
    ],
    ids=["missing", "gated-no-token", "bad-revision", "no-network"],
)
def test_hub_errors_are_one_clear_line(hub_env, monkeypatch, where, error, expected):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_has_token", lambda: False)
    monkeypatch.setattr(
        hub, "_remote_listing", lambda repo, rev: (COMMIT_A, ["config.json", "diffusion_pytorch_model.safetensors"])
    )

    def fail(*args):
        raise error()

    monkeypatch.setattr(hub, where, fail)
    with pytest.raises(hub.HubError, match=expected) as info:
        hub.resolve("org/nope@v9" if "revision" in expected else "org/nope")
    assert "\n" not in str(info.value)


def test_no_network_falls_back_to_the_cache(sources, hub_env, monkeypatch, count_conversions):
    put_snapshot(hub_env, "org/tiny-vae", COMMIT_A, diffusers_files(sources["diffusers"]))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub, "_remote_listing", unreachable)
    assert hub.resolve("org/tiny-vae").name == COMMIT_A


def test_repo_without_vae_weights_and_local_paths(hub_env, tmp_path):
    put_snapshot(hub_env, "org/pipe", COMMIT_A, {"README.md": b"x", "unet/config.json": b"{}"})
    with pytest.raises(hub.HubError, match=r"org/pipe@aaaaaaaaaaaa holds no VAE weights .*its folders: unet"):
        hub.resolve("org/pipe")
    # local paths are never Hub names, existing or not
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path / "missing")) == tmp_path / "missing"
    assert hub.resolve(pathlib.Path("out/flux")) == pathlib.Path("out/flux")  # a Path is a path
    assert not hub.is_hub_name("./out/flux") and hub.is_hub_name("out/flux@v1")
    assert hub.parse_name("black-forest-labs/FLUX.1-dev/vae@refs/pr/3") == (
        "black-forest-labs/FLUX.1-dev",
        "vae",
        "refs/pr/3",
    )
    assert hub.parse_name("black-forest-labs/FLUX.1-dev/vae@main") == ("black-forest-labs/FLUX.1-dev", "vae", "main")


# ---------------------------------------------------------------------------------------
# Command lines.


def test_eval_cli_reports_hub_errors_as_one_line(hub_env, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", "org/absent", f"data.path={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: org/absent is neither a local path nor in the local Hugging Face cache")
    )


def test_console_commands_and_version():
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name.startswith("sigmavae-")
    }
    assert scripts == {
        "sigmavae-train": "sigmavae_jax.cli.train:main",
        "sigmavae-eval": "sigmavae_jax.cli.eval:main",
        "sigmavae-convert": "sigmavae_jax.cli.convert:main",
    }, "reinstall: pip install --no-deps -e ."
    assert sigmavae_jax.__version__ == importlib.metadata.version("sigmavae_jax")
    bindir = pathlib.Path(sys.executable).parent
    for name, usage in (
        ("sigmavae-train", "--config CONFIG"),
        ("sigmavae-eval", "--checkpoint CHECKPOINT"),
        ("sigmavae-convert", "SRC OUT"),
    ):
        script = shutil.which(name, path=str(bindir))
        assert script, f"{name} is not installed next to {sys.executable}"
        done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {name}") and usage in done.stdout
