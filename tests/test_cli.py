"""What the command lines check before they start work: counts and flag combinations (argparse
usage errors, exit 2), the places results go, the model's size, the export named; and the
logging they set up."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import photo_folder_with_tiny_export

from sigmavae_jax import logs
from sigmavae_jax.cli import convert as convert_cli
from sigmavae_jax.cli import eval as eval_cli
from sigmavae_jax.cli import train as train_cli

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "parse, argv, message",
    [
        (train_cli.parse_args, ["--dump-top", "-1"], "argument --dump-top: must be 0 or more, got -1"),
        (eval_cli.parse_args, ["--dump-top", "x"], "argument --dump-top: must be an integer, got 'x'"),
        (train_cli.parse_args, ["--num-processes", "0"], "argument --num-processes: must be a positive integer, got 0"),
        (train_cli.parse_args, ["--process-id", "x"], "argument --process-id: must be an integer, got 'x'"),
        (train_cli.parse_args, ["--config", "tiny", "--num-processes", "2"], "need --coordinator HOST:PORT"),
        (
            train_cli.parse_args,
            ["--config", "tiny", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 must be below --num-processes 2",
        ),
        (eval_cli.parse_args, ["--size", "0"], "argument --size: must be a positive integer, got 0"),
        (eval_cli.parse_args, ["--batch-size", "-4"], "argument --batch-size: must be a positive integer, got -4"),
        (eval_cli.parse_args, ["--num-images", "0"], "argument --num-images: must be a positive integer, got 0"),
        (eval_cli.parse_args, ["--save-reconstructions", "-1"], "argument --save-reconstructions: must be 0 or more"),
        (eval_cli.parse_args, ["--figure-images", "0"], "argument --figure-images: must be a positive integer"),
        (eval_cli.parse_args, ["--checkpoint", "x", "--reference-stats", "r.npz"], "it needs --inception"),
        # an empty path (an unset shell variable) is neither "no flag" nor the working directory
        (train_cli.parse_args, ["--config", "tiny", "--init", ""], "argument --init: must be a path, got ''"),
        (train_cli.parse_args, ["--config", " "], "argument --config: must be a path, got ' '"),
        (eval_cli.parse_args, ["--checkpoint", ""], "argument --checkpoint: must be a path, got ''"),
        (eval_cli.parse_args, ["--checkpoint", "x", "--out", ""], "argument --out: must be a path"),
        (eval_cli.parse_args, ["--checkpoint", "x", "--compare", ""], "argument --compare: must be a path"),
        (convert_cli.parse_args, ["", "out"], "argument SRC: must be a path, got ''"),
        (convert_cli.parse_args, ["src", ""], "argument OUT: must be a path, got ''"),
    ],
)
def test_bad_counts_and_flag_combinations_are_usage_errors(parse, argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_overrides_may_sit_between_options():
    args = eval_cli.parse_args(
        ["--checkpoint", "x", "data.path=D", "--size", "32", "data.prefetch=0", "--latent-stats"]
    )
    assert args.overrides == ["data.path=D", "data.prefetch=0"] and args.size == 32 and args.mode == "latent-stats"
    args = train_cli.parse_args(["--config", "tiny", "data.path=D", "--dry-run", "train.steps=3"])
    assert args.overrides == ["data.path=D", "train.steps=3"] and args.dry_run


def test_eval_refuses_an_out_that_is_a_file_a_wrong_size_and_ema_of_an_export(tmp_path, capsys):
    export, _ = photo_folder_with_tiny_export(tmp_path, 2)
    base = ["--checkpoint", str(export), "--batch-size", "2", f"data.path={tmp_path}"]
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        assert eval_cli.main([*base, "--size", "32", "--out", str(out)]) == 2
        assert f"{tmp_path / 'a_file'} is a file, not a folder; choose another --out" in capsys.readouterr().err
    assert eval_cli.main([*base, "--size", "30", "--out", str(tmp_path / "o")]) == 2
    assert "--size 30 must be a multiple of 4 for this model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert eval_cli.main([*base, "--size", "32", "--ema"]) == 2
    assert "drop --ema or give the workdir" in capsys.readouterr().err
    workdir = tmp_path / "run"
    shutil.copytree(export, workdir / "export" / "step_00000010")
    assert eval_cli.main([*base[2:], "--checkpoint", str(workdir), "--size", "32", "--ema"]) == 2
    assert "has no EMA export (train.ema was off): drop --ema" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "bad.png").write_bytes(b"\x89PNG not really")
    assert eval_cli.main([*base[:4], "--size", "32", f"data.path={corrupt}", "--out", str(tmp_path / "o")]) == 2
    assert "batch size 2 (--batch-size) must be a multiple of the 8 devices; use 8" in capsys.readouterr().err
    argv = [*base[:2], "--batch-size", "8", "--size", "32", f"data.path={corrupt}", "--out", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 2
    assert f"no readable image in the image folder data.path={corrupt}" in capsys.readouterr().err


def test_other_libraries_info_logs_only_when_verbose(capsys):
    for verbose in (False, True):
        logs.setup(verbose=verbose)
        logging.getLogger("absl").info("orbax saved something")
        logging.getLogger("sigmavae_jax.train").info("resumed from here")
        logging.getLogger("absl").warning("a library's warning")
        err = capsys.readouterr().err
        assert "resumed from here" in err and "a library's warning" in err
        assert ("orbax saved something" in err) == verbose
    logs.setup()


def test_multihost_outside_a_cluster_is_one_line_naming_the_explicit_launch(tmp_path):
    # JAX's cluster detection reads these; without them it finds none (as on any lone machine)
    launchers = ("SLURM_", "OMPI_", "PMI_", "MPI_", "TPU_", "MEGASCALE_", "CLOUD_TPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launchers)}
    env["JAX_PLATFORMS"] = "cpu"
    for script, arguments in [
        ("train.py", ["--config", "tiny", f"data.path={tmp_path}", f"workdir={tmp_path / 'run'}"]),
        ("eval.py", ["--checkpoint", str(tmp_path / "export"), f"data.path={tmp_path}"]),
    ]:
        done = subprocess.run(
            [sys.executable, str(REPO / script), "--multihost", *arguments],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.startswith("error: --multihost found no cluster to join") and done.stderr.count("\n") == 1
        assert "--coordinator HOST:PORT --num-processes N --process-id I" in done.stderr
    assert not (tmp_path / "run").exists()
