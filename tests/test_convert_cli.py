"""convert_torch_weights.py on bad input: exit status 2, ONE `error: ...` line on stderr that
names the offending value, no traceback, and nothing written. Also that flags which would do
nothing are refused. Inputs are tiny files made here; the VAE-only ones never get converted."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from torch_reference import ldm_shapes

from sigmavae_jax.cli.convert import main, parse_args

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr); usage errors exit argparse-style."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, *fragments: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def assert_nothing_in(folder: pathlib.Path, *expected: str) -> None:
    """Only the inputs the test made are in `folder`: no output, no temporary file."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


@pytest.fixture
def wrong_keys_pth(tmp_path) -> pathlib.Path:
    """A readable torch state dict that is neither Inception nor VGG16 nor LPIPS heads."""
    path = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    return path


@pytest.fixture
def text_pt(tmp_path) -> pathlib.Path:
    path = tmp_path / "notes.pt"
    path.write_text("import os\nprint('not weights')\n")
    return path


@pytest.fixture
def tiny_ldm(tmp_path) -> pathlib.Path:
    """A complete, valid LDM-key VAE (z=4, quant convs), small enough to convert in seconds."""
    rng = np.random.default_rng(0)
    state = {
        key: rng.standard_normal(shape).astype(np.float32)
        for key, shape in ldm_shapes(32, (1, 2), 1, z=4, quant=True).items()
    }
    path = tmp_path / "vae.safetensors"
    safetensors.numpy.save_file(state, str(path))
    return path


# ---------------------------------------------------------------------------------------
# 1. A missing SRC.


@pytest.mark.parametrize("mode", ["inception", "lpips-vgg", "lpips-heads"])
def test_missing_src_names_the_file(capsys, tmp_path, wrong_keys_pth, mode):
    missing = tmp_path / "absent.pth"
    src, extra = {
        "inception": (missing, ["--inception"]),
        "lpips-vgg": (missing, ["--lpips-heads", wrong_keys_pth]),
        "lpips-heads": (wrong_keys_pth, ["--lpips-heads", missing]),
    }[mode]
    status, out, err = run_cli(capsys, src, tmp_path / "w.npz", *extra)
    assert status == 2
    assert_one_line_error(err, f"{missing}: no such file or folder")
    assert_nothing_in(tmp_path, "wrong.pth")
    assert out == ""


def test_missing_src_exits_2_without_traceback_from_the_script(tmp_path):
    done = subprocess.run(
        [sys.executable, "convert_torch_weights.py", str(tmp_path / "absent.pth"), str(tmp_path / "i.npz")]
        + ["--inception"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "absent.pth: no such file or folder" in error_lines[0]
    assert "pytorch-fid" in error_lines[0]  # and where to get the file
    assert "Traceback" not in done.stderr
    assert_nothing_in(tmp_path)


# ---------------------------------------------------------------------------------------
# 2, 7. Files that are not torch checkpoints, and checkpoints with the wrong keys.


@pytest.mark.parametrize("mode", ["inception", "lpips"])
def test_garbage_safetensors_src_is_named(capsys, tmp_path, mode):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage\n")
    extra = ["--inception"] if mode == "inception" else ["--lpips-heads", garbage]
    status, _, err = run_cli(capsys, garbage, tmp_path / "w.npz", *extra)
    assert status == 2
    assert_one_line_error(err, f"{garbage}: cannot read it", "corrupt")
    assert_nothing_in(tmp_path, "garbage.safetensors")


@pytest.mark.parametrize("mode", ["vae", "inception", "lpips"])
def test_text_file_as_pt_is_not_a_torch_checkpoint(capsys, tmp_path, text_pt, mode):
    out = tmp_path / ("vae_out" if mode == "vae" else "w.npz")
    extra = {"vae": [], "inception": ["--inception"], "lpips": ["--lpips-heads", text_pt]}[mode]
    status, _, err = run_cli(capsys, text_pt, out, *extra)
    assert status == 2
    assert_one_line_error(err, f"{text_pt}: not a torch checkpoint")
    assert "weights_only" not in err  # torch's advice to load it unsafely is not passed on
    assert_nothing_in(tmp_path, "notes.pt")


def test_wrong_inception_keys_are_summarised_on_one_line(capsys, tmp_path, wrong_keys_pth):
    status, _, err = run_cli(capsys, wrong_keys_pth, tmp_path / "i.npz", "--inception")
    assert status == 2
    assert_one_line_error(
        err,
        f"{wrong_keys_pth}: not pytorch-fid's FID Inception-v3",
        "470 missing keys: Conv2d_1a_3x3.conv.weight expected (32, 3, 3, 3),",
        " and 467 more; 1 unexpected keys: foo.weight",
    )
    assert_nothing_in(tmp_path, "wrong.pth")


def test_wrong_lpips_keys_are_summarised_on_one_line(capsys, tmp_path, wrong_keys_pth):
    status, _, err = run_cli(capsys, wrong_keys_pth, tmp_path / "l.npz", "--lpips-heads", wrong_keys_pth)
    assert status == 2
    assert_one_line_error(
        err,
        f"{wrong_keys_pth}: not torchvision's VGG16",
        "26 missing keys: features.0.weight expected (64, 3, 3, 3),",
        " and 23 more; 1 unexpected keys: foo.weight",
    )
    assert_nothing_in(tmp_path, "wrong.pth")


# ---------------------------------------------------------------------------------------
# 3, 4. OUT: never overwritten, and checked before anything is read.


@pytest.mark.parametrize("name", ["i.npz", "i.safetensors"])
@pytest.mark.parametrize("mode", ["inception", "lpips"])
def test_existing_weight_file_out_is_refused(capsys, tmp_path, wrong_keys_pth, mode, name):
    out = tmp_path / name
    out.write_bytes(b"keep me")
    extra = ["--inception"] if mode == "inception" else ["--lpips-heads", wrong_keys_pth]
    status, _, err = run_cli(capsys, wrong_keys_pth, out, *extra)
    assert status == 2
    assert_one_line_error(err, f"{out} exists; remove it or choose another path")
    assert out.read_bytes() == b"keep me"
    assert_nothing_in(tmp_path, "wrong.pth", name)


@pytest.mark.parametrize(
    "out_name, extra",
    [("x", []), ("x.safetensors", ["--to", "ldm"]), ("x", ["--to", "diffusers"]), ("x.npz", ["--inception"])],
    ids=["jax", "ldm", "diffusers", "inception"],
)
def test_out_under_a_file_is_refused_before_converting(capsys, tmp_path, tiny_ldm, out_name, extra):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / out_name
    status, _, err = run_cli(capsys, tiny_ldm, out, *extra)
    assert status == 2
    assert_one_line_error(err, f"{out} cannot be created because {afile} is a file, not a folder")
    assert afile.read_text() == ""
    assert_nothing_in(tmp_path, "afile", "vae.safetensors")


# ---------------------------------------------------------------------------------------
# 5. Flags that would do nothing.


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--inception", "--lpips-heads", "vgg.pth"], "--inception and --lpips-heads are mutually exclusive"),
        (["--inception", "--to", "jax"], "--to applies to VAE conversion only; leave it out with --inception"),
        (["--lpips-heads", "vgg.pth", "--dtype", "float32"], "--dtype applies to VAE conversion only"),
        (["--inception", "--config", "sd"], "--config applies to VAE conversion only"),
        (
            ["--lpips-heads", "vgg.pth", "--config", "sd", "--to", "ldm", "--dtype", "bfloat16"],
            "--config, --to and --dtype apply to VAE conversion only; leave them out with --lpips-heads",
        ),
    ],
    ids=["inception+lpips", "inception+to", "lpips+dtype", "inception+config", "lpips+all"],
)
def test_flags_that_would_be_ignored_are_usage_errors(capsys, tmp_path, wrong_keys_pth, extra, message):
    status, _, err = run_cli(capsys, wrong_keys_pth, tmp_path / "w.npz", *extra)
    assert status == 2
    assert_one_line_error(err, message)
    assert_nothing_in(tmp_path, "wrong.pth")


def test_vae_flags_keep_their_defaults_but_count_when_given_with_their_default(capsys):
    args = parse_args(["src", "out"])
    assert (args.to, args.dtype, args.config) == ("jax", "float32", None)
    assert parse_args(["src", "out", "--to", "ldm", "--dtype", "bfloat16"]).to == "ldm"
    with pytest.raises(SystemExit) as info:  # the default value, but given: still refused
        parse_args(["src", "out.npz", "--inception", "--dtype", "float32"])
    assert info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "--dtype applies to VAE conversion only")


# ---------------------------------------------------------------------------------------
# 6. Bad input to a VAE conversion exits 2 as well.


def test_bad_config_exits_2(capsys, tmp_path, tiny_ldm):
    status, _, err = run_cli(capsys, tiny_ldm, tmp_path / "out", "--config", "no_such_config")
    assert status == 2
    assert_one_line_error(err, "no_such_config")
    assert_nothing_in(tmp_path, "vae.safetensors")


def test_vae_with_wrong_keys_exits_2_on_one_line(capsys, tmp_path):
    shapes = ldm_shapes(32, (1, 1, 1), 1, z=4, quant=True)  # configs/tiny.yaml
    del shapes["decoder.conv_out.bias"]
    state = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    state["decoder.conv_in.bias"] = np.zeros(7, np.float32)
    src = tmp_path / "vae.safetensors"
    safetensors.numpy.save_file(state, str(src))
    status, _, err = run_cli(capsys, src, tmp_path / "out", "--config", "tiny")
    assert status == 2
    assert_one_line_error(
        err,
        f"{src} (ldm keys) does not fit the model",
        "1 missing: decoder.conv_out.bias expected (3,); 1 mis-shaped: decoder.conv_in.bias got (7,) instead of",
    )
    assert_nothing_in(tmp_path, "vae.safetensors")
