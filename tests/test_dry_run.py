"""Compiling for TPU slices on this CPU host: slice names, the batch search, and the tiny
config's train step and codec compiled for single- and multi-host slices, their figures read
against the compiled program itself."""

import json
import os
import subprocess
import sys

import jax
import pytest

from sigmavae_jax import dry_run, kernels, topology
from sigmavae_jax.cli import dry_run as cli_dry_run
from sigmavae_jax.cli import eval as eval_cli
from sigmavae_jax.cli import train as train_cli
from sigmavae_jax.config import ConfigError, load_config
from sigmavae_jax.train.program import build_program

SIZE = 32  # the tiny config at 32 x 32 compiles for a TPU in about a minute here


def tiny(*overrides):
    return load_config("tiny", [f"train.image_size={SIZE}", "train.compute_dtype=bfloat16", *overrides])


@pytest.mark.parametrize(
    "name, topology_name, chips, hosts",
    [
        ("v5litepod-4", "v5e:2x2", 4, 1),
        ("v5litepod-8", "v5e:2x4", 8, 1),
        ("v5litepod-16", "v5e:4x4", 16, 4),
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v4-32", "v4:2x2x4", 16, 4),
        ("v5p-8", "v5p:2x2x1", 4, 1),
        ("v6e-8", "v6e:2x4", 8, 1),
        ("v6e-16", "v6e:4x4", 16, 4),
        ("v5e:4x4", "v5e:4x4", 16, 4),
        ("v4:2x2x4", "v4:2x2x4", 16, 4),
        ("V5E:2x2", "v5e:2x2", 4, 1),
    ],
)
def test_cloud_and_jax_slice_names_describe_the_same_chips(name, topology_name, chips, hosts):
    tpu_slice = topology.parse_slice(name)
    assert (tpu_slice.topology, tpu_slice.chips, tpu_slice.hosts) == (topology_name, chips, hosts)
    devices = topology.slice_devices(tpu_slice)  # libtpu's description, one device per chip
    assert len(devices) == chips and {d.platform for d in devices} == {"tpu"}
    assert len({d.process_index for d in devices}) == hosts


def test_describing_a_slice_on_a_host_without_a_tpu_prints_nothing_on_stderr():
    # libtpu, finding no local TPU, printed "E0000 ... unexpected worker hostname" above every dry
    # run's report: an error that was none. A fresh process, without this process' settings.
    script = (
        "from sigmavae_jax import topology\n"
        "topology.compile_only_environment()\n"
        "print(len(topology.slice_devices(topology.parse_slice('v4-32'))))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("TPU_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16"]
    assert out.stderr == ""


def test_a_process_told_to_use_the_local_tpu_keeps_libtpu_looking_for_it(monkeypatch):
    for key in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    topology.compile_only_environment()
    assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    topology.compile_only_environment()
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"


def test_a_run_on_a_host_without_tpu_nodes_starts_jax_without_libtpu_errors():
    # Every train.py/eval.py/demo run on a CPU or GPU host with the [tpu] or [test] extra began
    # with libtpu's "E0000 ... unexpected worker hostname". A fresh process, without this
    # process' settings, on a host taken to have no TPU device nodes.
    script = (
        "from sigmavae_jax import topology\n"
        "topology._TPU_DEVICE_NODES = ('/nonexistent/accel*',)\n"
        "topology.quiet_libtpu_on_a_host_without_tpu()\n"
        "import jax\n"
        "print(jax.devices()[0].platform)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu"] and out.stderr == ""


def test_a_host_with_tpu_nodes_or_a_process_asking_for_a_tpu_keeps_libtpu_as_it_is(monkeypatch, tmp_path):
    for key in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_PLATFORMS"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "accel0").write_text("")
    monkeypatch.setattr(topology, "_TPU_DEVICE_NODES", (str(tmp_path / "accel*"),))
    topology.quiet_libtpu_on_a_host_without_tpu()
    assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ
    monkeypatch.setattr(topology, "_TPU_DEVICE_NODES", (str(tmp_path / "none*"),))
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    topology.quiet_libtpu_on_a_host_without_tpu()
    assert "TPU_ACCELERATOR_TYPE" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    topology.quiet_libtpu_on_a_host_without_tpu()
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v5litepod-1" and os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"


@pytest.mark.parametrize("name", ["v7-8", "h800", "v5e:3x3", "v4:2x2", "v5litepod-12"])
def test_unknown_topology_is_a_one_line_error(name, capsys):
    with pytest.raises(topology.UnknownTopology) as error:
        topology.parse_slice(name)
    assert "\n" not in str(error.value) and name.lower() in str(error.value).lower()
    code = train_cli.main(["--config", "tiny", "--dry-run", "--topology", name])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")
    if name in ("v7-8", "h800"):
        assert "v5litepod-16" in err and "v4-32" in err and "h100" in err  # the known names are listed


# A compiled TPU module's text, cut down: a 3-channel image prefetched into on-chip memory (S(1))
# by an asynchronous copy, a weight sliced in by an asynchronous slice, and one fusion.
_ASYNC_HLO = """
%fused_computation (p0: bf16[8,32,32,3], p1: f32[1,3,128,256]) -> bf16[8,32,32,256] {
  %p0 = bf16[8,32,32,3]{0,3,2,1:T(4,128)(2,1)} parameter(0)
}

ENTRY %main (param.0: bf16[8,32,32,3], param.1: f32[3,3,128,256]) -> bf16[8,32,32,256] {
  %param.0 = bf16[8,32,32,3]{0,3,2,1:T(4,128)(2,1)} parameter(0)
  %param.1 = f32[3,3,128,256]{3,2,1,0:T(8,128)} parameter(1)
  %copy-start = (bf16[8,32,32,3]{0,3,2,1:T(4,128)(2,1)S(1)}, bf16[8,32,32,3]{0,3,2,1:T(4,128)(2,1)}, u32[]{:S(2)}) copy-start(%param.0)
  %copy-done = bf16[8,32,32,3]{0,3,2,1:T(4,128)(2,1)S(1)} copy-done(%copy-start)
  %slice-start = ((f32[3,3,128,256]{3,2,1,0:T(8,128)}), f32[1,3,128,256]{3,2,1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.1), slice={[0:1], [0:3], [0:128], [0:256]}
  %slice-done = f32[1,3,128,256]{3,2,1,0:T(8,128)S(1)} slice-done(%slice-start)
  ROOT %fusion = bf16[8,32,32,256]{3,0,2,1:T(8,128)(2,1)} fusion(%copy-done, %slice-done), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(f)/conv_general_dilated"}
}
"""  # noqa: E501 (HLO lines as the compiler writes them)


def test_the_traffic_listing_counts_tiles_as_laid_out_asynchronous_moves_once_and_on_chip_bytes():
    padded_image = 2 * 32 * 32 * 4 * 128  # bf16, (channels, batch) padded to a (4, 128) tile
    weight_slice = 4 * 3 * 128 * 256
    output = 2 * 8 * 32 * 32 * 256
    rows = {row["op"]: row for row in dry_run.hlo_traffic(_ASYNC_HLO)}
    assert set(rows) == {"copy-start", "slice-start", "fusion:kOutput"}  # the done ops add nothing
    assert rows["copy-start"]["bytes"] == 2 * padded_image
    assert rows["slice-start"]["bytes"] == 2 * weight_slice
    fusion = rows["fusion:kOutput"]
    assert fusion["bytes"] == padded_image + weight_slice + output
    # both moves write into on-chip memory (S(1)) what they read from HBM; the fusion reads both
    # there and writes its output to HBM
    assert rows["copy-start"]["on_chip"] == padded_image
    assert rows["slice-start"]["on_chip"] == weight_slice
    assert fusion["on_chip"] == padded_image + weight_slice
    assert (fusion["shape"], fusion["source"]) == ("bf16[8,32,32,256]", "jit(f)/conv_general_dilated")


CAPACITY = 16.0  # GiB, for the made-up memory curves below


def _search(used, start, truth_limit=None, report=None):
    """largest_fitting over a made-up memory curve: (answer, the batches it measured). A batch fits
    when used(n) <= CAPACITY, or n <= truth_limit when given (the verdict then comes from
    elsewhere, as a refused compile's does); report(n) is the bytes it reports (default used(n))."""
    asked = []

    def measure(n):
        asked.append(n)
        fits = n <= truth_limit if truth_limit is not None else used(n) <= CAPACITY
        return fits, (report or used)(n)

    return dry_run.largest_fitting(measure, CAPACITY, start=start), asked


def _truth(used):
    return max((n for n in range(1, 4096) if used(n) <= CAPACITY), default=0)


# memory against the batch: linear, per-image memory falling as batches grow (the TPU steps'),
# rising (a compiler that rematerialises more at large batches), and a staircase
_CURVES = {
    "linear": lambda n: 1.3 + 0.27 * n,
    "concave": lambda n: 1.0 + 0.5 * n**0.85,
    "convex": lambda n: 2.0 + 0.05 * n**1.3,
    "steps": lambda n: 0.5 + 0.25 * (n // 4) * 4,
    "nothing fits": lambda n: 17.0 + n,
}


@pytest.mark.parametrize(
    "op_name, layer",
    [
        ("jit(fn)/encoder/down/0/block/1/conv_general_dilated", "encoder/down/0/block/1"),
        ("jit(train_step)/transpose(jvp(decoder/up/1/upsample))/reduce_sum", "decoder/up/1/upsample"),
        (
            "jit(train_step)/transpose(jvp(decoder/up/0/block/1))/jvp(decoder/up/0/block/1)/"
            "transpose(jvp(decoder/up/0/block/1))/add_any",
            "decoder/up/0/block/1",
        ),
        ("jit(train_step)/cond/branch_1_fun/discriminator/conv_general_dilated", "cond/branch_1_fun/discriminator"),
        ("jit(fn)/decoder/mid/attn_1/jit(silu)/mul", "decoder/mid/attn_1"),
        ("jit(fn)/jit(silu)/mul", "mul"),
        ("jit(train_step)/transpose(jvp())/select_n", "select_n"),
        ("copy-start.17", "copy-start"),
    ],
)
def test_an_operation_is_put_in_the_layer_its_jax_name_holds(op_name, layer):
    assert dry_run.layer_of(op_name) == layer


def test_the_models_scopes_are_their_parameter_paths_and_stay_out_of_the_state():
    from flax import nnx

    from sigmavae_jax.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(load_config("tiny").model, rngs=nnx.Rngs(0))
    conv2 = model.encoder.down[1].block[0].conv2
    assert conv2.scope_name == "encoder/down/1/block/0/conv2"
    assert nnx.to_pure_dict(nnx.state(model))["encoder"]["down"][1]["block"][0]["conv2"].keys() == {"kernel", "bias"}
    assert model.decoder.up[1].upsample.scope_name == "decoder/up/1/upsample"


@pytest.mark.parametrize("curve", list(_CURVES))
def test_largest_fitting_finds_the_largest_batch_on_any_memory_curve(curve):
    used = _CURVES[curve]
    for start in [1, 2, 8, 16, 40, 500]:
        found, asked = _search(used, start)
        assert found == _truth(used), (curve, start, asked)
        assert len(set(asked)) == len(asked)  # no batch measured twice
        assert len(asked) <= 2 * 12 + 2  # doubling and bisection at worst: logarithmic in the answer


def test_largest_fitting_follows_the_memory_line_to_the_answer_in_few_measurements():
    # linear memory, started at 8: 8 and 16 give the line, its crossing fits, one more does not
    found, asked = _search(_CURVES["linear"], 8)
    assert found == 54 and asked == [8, 16, 54, 55]
    # doubling and bisection alone (verdicts without bytes) take more, on the same curve
    found, blind = _search(_CURVES["linear"], 8, truth_limit=54, report=lambda n: 0.0)
    assert found == 54 and len(blind) > len(asked) + 3
    # per-image memory that falls as batches grow: the line underestimates, and is redrawn
    found, asked = _search(_CURVES["concave"], 8)
    assert found == _truth(_CURVES["concave"]) and len(asked) <= 7


def test_largest_fitting_bisects_where_the_bytes_disagree_with_the_verdict():
    """A refused compile may report bytes below the capacity; the verdict rules, the bytes of
    such points are not used for the line."""
    used = _CURVES["linear"]
    for limit_fit in [0, 1, 3, 30, 54]:
        found, _ = _search(used, 8, truth_limit=limit_fit, report=lambda n: used(n) if n <= limit_fit else 1.0)
        assert found == limit_fit


def test_global_batch_that_does_not_split_over_the_chips_is_the_run_error(capsys):
    code = train_cli.main(["--config", "tiny", "--dry-run", "--topology", "v5litepod-4", "train.batch_size=6"])
    assert code == 2
    assert "global batch size 6 must be a multiple of the 4 devices" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="multiple of the 4 devices"):
        dry_run.train_step_report(tiny("train.batch_size=6"), topology.parse_slice("v5e:2x2"))


def test_a_mesh_the_slice_cannot_form_is_the_run_error(capsys):
    code = train_cli.main(["--config", "tiny", "--dry-run", "--topology", "v5litepod-4", "train.mesh_fsdp=3"])
    assert code == 2
    assert "train.mesh_fsdp=3 must divide the 4 devices; use one of [1, 2, 4]" in capsys.readouterr().err
    code = train_cli.main(["--config", "tiny", "--dry-run", "--topology", "v4-8", "train.mesh_data=3"])
    assert code == 2
    assert "train.mesh_data=3 x train.mesh_fsdp=1 must equal the 4 devices" in capsys.readouterr().err


def test_tpu_step_holds_the_conditionals_and_none_of_the_cpu_forms_and_reports_its_own_cost():
    """One compile for v5e:2x2 (2 images per chip): the accelerator program (lax.cond for the
    GAN's two branches, none of the CPU kernels although this host is a CPU), and the report's
    figures are the compiled program's memory and cost analysis."""
    keep = {}
    report = dry_run.train_step_report(tiny("train.batch_size=8"), topology.parse_slice("v5litepod-4"), keep=keep)
    compiled = keep["compiled"]
    assert keep["program"].modules.kernels is kernels.XLA
    hlo = compiled.as_text()
    assert hlo.count(" conditional(") >= 2  # the generator's GAN term and the discriminator update
    assert f"/{kernels.CPU_SCOPE}/" not in hlo  # op metadata names every CPU kernel's operations
    # the control: forced CPU kernels on the same slice do show in the program's names
    forced = build_program(tiny("train.batch_size=8", "train.kernels=cpu"), keep["program"].mesh, abstract=True)
    assert f"/{kernels.CPU_SCOPE}/" in forced.step.lower(*forced.abstract_arguments()).as_text(debug_info=True)
    cost, memory = dry_run.cost_of(compiled), compiled.memory_analysis()
    assert report.batch_per_chip == 2 and report.fits
    assert report.flops_per_image * 2 == pytest.approx(cost["flops"], rel=1e-12)
    assert report.bytes_per_image * 2 == pytest.approx(cost["bytes accessed"], rel=1e-12)
    assert report.temporaries == memory.temp_size_in_bytes and report.outputs == memory.output_size_in_bytes
    # the arguments' logical sizes, by part, within what the chip allocates for them (small
    # arrays padded to whole tiles: the tiny model's are mostly small)
    assert report.allocated_arguments == memory.argument_size_in_bytes
    assert 0.6 * memory.argument_size_in_bytes < sum(report.arguments.values()) <= memory.argument_size_in_bytes
    # --dump-top's listing reads the same program: its operations account for the cost analysis' bytes
    rows = dry_run.hlo_traffic(hlo)
    assert rows[0]["bytes"] >= rows[-1]["bytes"]
    assert sum(row["bytes"] for row in rows) == pytest.approx(cost["bytes accessed"], rel=0.05)
    assert 0 < sum(row["on_chip"] for row in rows) < sum(row["bytes"] for row in rows)  # XLA stages some in VMEM
    assert any("conv_general_dilated" in row["source"] for row in rows)
    # the listing sums by layer: the models' scopes, named after their parameter paths, through
    # the backward pass's transforms
    layers = {layer: size for layer, size, _ in dry_run.traffic_by_layer(rows)}
    assert {"encoder/conv_in", "encoder/down/0/block/0", "decoder/up/0/block/1", "lpips"} <= set(layers), layers
    assert sum(layers.values()) == sum(row["bytes"] for row in rows)
    chip = topology.CHIPS["v5e"]
    want = min(chip.bf16_flops / report.flops_per_image, chip.hbm_bandwidth / report.bytes_per_image)
    assert report.roofline_images_per_s == pytest.approx(want)
    figures = report.figures()
    assert json.loads(json.dumps(figures))["hbm_total"] == report.total
    assert report.total == (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )


def test_dry_run_for_a_four_host_slice_from_one_host_reports_figures(capsys):
    """v4-32: 16 chips over 4 hosts, compiled here without jax.distributed."""
    assert jax.process_count() == 1
    code = train_cli.main(
        [
            "--config",
            "tiny",
            "--dry-run",
            "--topology",
            "v4-32",
            f"train.image_size={SIZE}",
            "train.batch_size=16",
            "train.compute_dtype=bfloat16",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    figures = json.loads(out.strip().splitlines()[-1])
    assert (figures["topology"], figures["chips"], figures["hosts"], figures["batch_per_chip"]) == (
        "v4:2x2x4",
        16,
        4,
        1,
    )
    assert figures["fits"] and figures["flops_per_image"] > 0 and figures["bytes_per_image"] > 0
    assert figures["roofline_images_per_s_per_chip"] > 0
    assert set(figures["hbm_arguments"]) >= {"parameters", "optimizer state", "EMA", "discriminator", "LPIPS"}
    for words in (
        "HBM per chip",
        "argument parameters",
        "temporaries",
        "fits",
        "FLOP, ",
        "GB of HBM traffic",
        "images/s per chip",
    ):
        assert words in out


def test_a_step_that_does_not_fit_exits_non_zero_and_says_what_to_change(capsys):
    code = train_cli.main(
        ["--config", "tiny", "--dry-run", "--topology", "v5litepod-1", "train.image_size=2048", "train.batch_size=4"]
    )
    captured = capsys.readouterr()
    assert code == 4
    figures = json.loads(captured.out.strip().splitlines()[-1])
    assert not figures["fits"] and figures["hbm_total"] > figures["hbm_capacity"]
    assert "does not fit" in captured.out
    for hint in (
        "train.batch_size",
        "--find-batch",
        "train.remat=blocks",
        "train.remat=true",
        "train.compute_dtype=bfloat16",
    ):
        assert hint in captured.err


def test_the_advice_goes_on_to_the_remat_setting_with_less_memory():
    """With train.remat=true or blocks the advice names train.remat=nested; with nested, no
    remat setting is left to name."""
    from sigmavae_jax import dry_run, topology
    from sigmavae_jax.config import load_config

    refused = dry_run.Report("step", topology.parse_slice("v5litepod-1"), 4, {}, total=2**40, fits=False)
    for remat, names in (("true", True), ("blocks", True), ("nested", False)):
        said = dry_run.advice(refused, load_config("tiny", [f"train.remat={remat}"]))
        assert ("train.remat=nested" in said) == names, said
        assert "train.batch_size" in said


def test_eval_dry_run_reports_encode_and_decode(capsys):
    code = eval_cli.main(
        [
            "--dry-run",
            "--topology",
            "v5litepod-4",
            "--config",
            "tiny",
            "--size",
            str(SIZE),
            "--batch-size",
            "8",
            "--dtype",
            "bfloat16",
            "--dump-top",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    figures = json.loads(out.strip().splitlines()[-1])
    for name in ("encode", "decode"):
        assert figures[name]["fits"] and figures[name]["batch_per_chip"] == 2
        assert figures[name]["flops_per_image"] > 0 and figures[name]["roofline_images_per_s_per_chip"] > 0
    # --dump-top lists each program's own operations, after its report, against its cost analysis
    listings = out.split("the 3 operations that move the most:")[1:]
    assert len(listings) == 2, out
    for listing in listings:  # the header and three operations, then the sums by source
        assert len([line for line in listing.split("summed by layer:")[0].splitlines() if line.strip()]) == 4
    for name in ("encode", "decode"):
        analysed = figures[name]["bytes_per_image"] * 2 / 1e9
        assert f"HBM traffic per device: {analysed:.2f} GB (cost analysis)" in out, out
    # below 8 per chip the compiler lays the convs' inputs out again: the report says so, and the
    # bytes per image are several times those at 8 per chip (if this stops, the note can go)
    assert out.count("note: below 8 images per chip") == 2
    argv = ["--dry-run", "--topology", "v5litepod-4", "--config", "tiny", "--size", str(SIZE), "--dtype", "bfloat16"]
    assert eval_cli.main([*argv, "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "note: below" not in out
    at_eight = json.loads(out.strip().splitlines()[-1])
    for name in ("encode", "decode"):
        assert at_eight[name]["batch_per_chip"] == 8
        assert figures[name]["bytes_per_image"] > 3 * at_eight[name]["bytes_per_image"], name
    # decoding a tiny f4 model's latent costs more than encoding the image (more blocks, upsampling)
    assert figures["decode"]["flops_per_image"] > figures["encode"]["flops_per_image"]


@pytest.mark.parametrize("cli", [train_cli, eval_cli], ids=["train", "eval"])
@pytest.mark.parametrize("flag", [["--dump-top", "3"], ["--topology", "v5litepod-4"]])
def test_dry_run_options_without_dry_run_are_an_error(cli, flag, capsys):
    assert cli.main(["--config", "tiny", *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dry-run needs --topology") and "need --dry-run" in err, err


def test_fsdp_shards_parameters_and_optimizer_state_over_the_slice():
    """train.mesh_fsdp=4 on v5e:2x2: each chip holds a quarter of every big array (no compile:
    the breakdown comes from the shardings the step is compiled with)."""
    from sigmavae_jax.train.program import build_program

    per_chip = {}
    for fsdp in (1, 4):
        cfg = tiny("train.batch_size=8", f"train.mesh_fsdp={fsdp}", "train.fsdp_min_size=1024")
        program = build_program(cfg, dry_run.slice_mesh(cfg, topology.parse_slice("v5e:2x2")), abstract=True)
        state, _, _ = program.abstract_arguments()
        per_chip[fsdp] = {
            name: dry_run.per_device_bytes(tree)
            for name, tree in (("parameters", state.params), ("optimizer state", state.opt_state), ("EMA", state.ema))
        }
    for name, whole in per_chip[1].items():
        assert whole / 4 <= per_chip[4][name] < 0.4 * whole, name  # small arrays stay whole


def test_find_batch_searches_per_chip_batches_and_reports_the_largest(monkeypatch, capsys):
    """The command line's search over per-chip batches (compiles replaced by a rule: 4 GiB and 1
    GiB per image, so up to 12 images per chip fit in 16 GiB), ending in the report and JSON of
    the largest."""
    asked = []

    def fake_report(cfg, tpu_slice, keep=None, flops=True):
        per_chip = cfg.train.batch_size // tpu_slice.chips
        asked.append(per_chip)
        total = (4 + per_chip) * 2**30
        if keep is not None and total <= tpu_slice.capacity:
            keep["compiled"] = f"the program at {per_chip} per chip"
        return dry_run.Report(
            "train step",
            tpu_slice,
            per_chip,
            {"parameters": 2**20},
            total=total,
            fits=total <= tpu_slice.capacity,
            flops_per_image=1e12 * (1.1 if per_chip >= 12 else 1.0),  # as if the compiler recomputed near the limit
            bytes_per_image=5e9,
        )

    listed = []
    monkeypatch.setattr(dry_run, "train_step_report", fake_report)
    monkeypatch.setattr(
        cli_dry_run, "print_top_ops", lambda compiled, count, batch: listed.append((compiled, count, batch))
    )
    code = train_cli.main(
        ["--config", "tiny", "--dry-run", "--topology", "v5litepod-4", "--find-batch", "train.batch_size=8"]
        + ["--dump-top", "5"]
    )
    out = capsys.readouterr().out
    assert code == 0
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["max_batch_per_chip"] == 12 and figures["max_global_batch"] == 48 and figures["batch_per_chip"] == 12
    assert figures["max_batch_extra_flops"] == pytest.approx(0.1)  # against the smallest batch compiled, 2 per chip
    assert "FLOPs per image at 12 per chip: +10.0% against 2 per chip" in out
    # from the config's 8 / 4 chips, doubled; the line through 2 and 4 meets 16 GiB at 12; 13 does not fit
    assert asked == [2, 4, 12, 13]
    assert "largest batch that fits: 12 per chip (train.batch_size=48)" in out
    assert listed == [("the program at 12 per chip", 5, 12)]  # --dump-top lists the largest batch's program
