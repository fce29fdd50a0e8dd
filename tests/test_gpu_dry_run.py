"""Compiling for GPUs on this CPU host, with no GPU and no CUDA library: the CUDA compiler
plugin describes H100, H200, A100 and B200 devices from the packaged descriptions, and the
tiny config's step and codec compile for them; their figures are read against the compiled
program and against the same program lowered for one CPU device.

The plugin is not in the test environment itself (every JAX process that has it prints two
lines on stderr): `make setup` installs it into <venv>/gpu-plugin, and the GPU compiles run in
subprocesses with it on PYTHONPATH. Without it these tests fail and say so; none is skipped.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from sigmavae_jax import dry_run, kernels, parallel, topology
from sigmavae_jax.cli import train as train_cli
from sigmavae_jax.config import load_config
from sigmavae_jax.train.program import build_program

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLUGIN = pathlib.Path(sys.prefix) / "gpu-plugin"
SIZE = 32  # the tiny config at 32 x 32: a GPU compile of its step takes 40-100 s here
TINY = [f"train.image_size={SIZE}", "train.compute_dtype=bfloat16"]
MEMORY_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def tiny(*overrides):
    return load_config("tiny", [*TINY, *overrides])


@pytest.fixture(scope="module")
def gpu_env():
    """The environment of a process that has the CUDA compiler plugin (JAX on the CPU)."""
    if not (PLUGIN / "jax_plugins" / "xla_cuda12").is_dir():
        pytest.fail(
            f"the CUDA compiler plugin is not in {PLUGIN}; run make setup (it installs jax-cuda12-plugin "
            "there with pip install --no-deps --target)"
        )
    env = {key: value for key, value in os.environ.items() if key not in (*MEMORY_VARIABLES, "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(PLUGIN), "JAX_PLATFORMS": "cpu"}


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def our_stderr(err: str) -> list[str]:
    """stderr without the plugin's start-up lines (absl's notice and cudart_stub's "no driver")."""
    return [
        line
        for line in err.strip().splitlines()
        if line and "absl::InitializeLog" not in line and "cudart_stub.cc" not in line
    ]


def test_gpu_names_parse_to_nodes_and_unknown_ones_list_the_known(capsys):
    for name, canonical, gpus, nodes in [
        ("h100", "h100", 1, 1),
        ("8xh100", "8xh100", 8, 1),
        ("1x8xH100", "8xh100", 8, 1),
        ("2x8xh100", "2x8xh100", 16, 2),
        ("a100-80gb", "a100-80gb", 1, 1),
        ("4xb200", "4xb200", 4, 1),
        ("h200", "h200", 1, 1),
    ]:
        gpu_slice = topology.parse_slice(name)
        assert (gpu_slice.topology, gpu_slice.chips, gpu_slice.hosts, gpu_slice.chip.unit) == (
            canonical,
            gpus,
            nodes,
            "GPU",
        )
    for name in ("h800", "8xl40s", "16xh100"):
        code = train_cli.main(["--config", "tiny", "--dry-run", "--topology", name])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and name in err
        if name == "16xh100":
            assert "2x8xh100" in err  # more than a node's GPUs: name nodes
        else:
            assert all(known in err for known in ("h100", "h200", "a100-80gb", "b200", "8xh100", "v5litepod-16"))


def test_packaged_descriptions_hold_the_table_figures():
    """One truth: each GPU's description gives the compiler the memory and bandwidth the
    report's table holds."""
    for model, chip in topology.GPUS.items():
        text = topology.gpu_target_config(model)
        fields = {key: float(value) for key, value in re.findall(r"^\s*(\w+): ([\d.]+)", text, re.M)}
        assert fields["device_memory_size"] == chip.hbm_bytes and fields["memory_bandwidth"] == chip.hbm_bandwidth, (
            model
        )
        assert 'platform_name: "CUDA"' in text


def test_memory_fraction_is_read_as_jax_reads_it(monkeypatch):
    for variable in MEMORY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    h100 = topology.parse_slice("h100")
    assert topology.gpu_memory_fraction() == 0.75 and h100.capacity == int(0.75 * h100.chip.hbm_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert h100.capacity == int(0.9 * h100.chip.hbm_bytes)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.5")  # the newer name wins, as in jaxlib
    assert h100.capacity == int(0.5 * h100.chip.hbm_bytes)
    assert topology.parse_slice("v5litepod-4").capacity == 16 * 2**30  # TPUs: the chip's HBM
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "90%")
    with pytest.raises(ValueError, match="XLA_CLIENT_MEM_FRACTION='90%'.*e.g. 0.9"):
        topology.gpu_memory_fraction()


_DESCRIBE = """
import json
from sigmavae_jax import kernels, topology
topology.compile_only_environment()
out = {}
for name in ["h100", "8xh100", "2x8xh100", "h200", "a100-80gb", "b200"]:
    devices = topology.slice_devices(topology.parse_slice(name))
    out[name] = [len(devices), len({d.process_index for d in devices}), sorted({d.platform for d in devices}),
                 devices[0].device_kind, kernels.select("auto", devices).name]
print(json.dumps(out))
"""


def test_plugin_describes_each_gpu_and_the_code_path_follows_them(gpu_env):
    done = run(["-c", _DESCRIBE], gpu_env)
    assert done.returncode == 0, done.stderr[-3000:]
    described = last_json(done.stdout)
    kinds = {
        "h100": "NVIDIA H100 80GB HBM3",
        "h200": "NVIDIA H200 141GB HBM3e",
        "a100-80gb": "NVIDIA A100-SXM4-80GB",
        "b200": "NVIDIA B200",
    }
    for name, (count, processes, platforms, kind, chosen) in described.items():
        gpu_slice = topology.parse_slice(name)
        assert (count, processes) == (gpu_slice.chips, gpu_slice.hosts), name  # 2x8xh100: 16 GPUs, 2 processes
        assert platforms == ["gpu"] and kind == kinds[gpu_slice.generation] and chosen == kernels.GPU.name, name


_BLOCK_TRAFFIC = """
from sigmavae_jax import topology

topology.compile_only_environment()
import json

import jax
import jax.numpy as jnp
from flax import nnx

from sigmavae_jax import dry_run, kernels
from sigmavae_jax.models import layers

gpu = jax.sharding.SingleDeviceSharding(topology.slice_devices(topology.parse_slice("h100"))[0])
x = jax.ShapeDtypeStruct((8, 128, 128, 128), jnp.bfloat16, sharding=gpu)
moved = {}
for chosen in (kernels.XLA, kernels.GPU):
    block = layers.ResnetBlock(128, 128, groups=32, dtype=jnp.bfloat16, kernels=chosen, rngs=nnx.Rngs(0))
    graph, state = nnx.split(block)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=gpu), state)

    def loss(state, x):
        return jnp.mean(jnp.abs(nnx.merge(graph, state)(x).astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    moved[chosen.name] = sum(row["bytes"] for row in dry_run.hlo_traffic(compiled.as_text()))
print(json.dumps(moved))
"""


def test_gpu_kernels_block_backward_moves_fewer_bytes_than_the_written_one_in_a_gpu_program(gpu_env):
    """Compiled for one H100 in bf16 at 8 images of 128 x 128 x 128, a ResnetBlock's forward and
    backward moves at least two activations fewer with the GPU kernels (autodiff's backward)
    than with the XLA kernels' written one, by the program's listed traffic (the GPU compiler
    gives no cost analysis): cuDNN's convs take no fused operand, so both of the written
    backward's copies of the GroupNorm input gradient are written and read (the TPU program is
    the other way round: tests/test_kernels.py)."""
    done = run(["-c", _BLOCK_TRAFFIC], gpu_env)
    assert done.returncode == 0, done.stderr[-3000:]
    moved = last_json(done.stdout)
    activation = 8 * 128 * 128 * 128 * 2
    assert moved["xla"] - moved["gpu"] >= 2 * activation, (moved, activation)


_STEP = """
import json, pathlib, sys
from sigmavae_jax import kernels
from sigmavae_jax.cli import dry_run as cli
from sigmavae_jax.config import load_config
from sigmavae_jax.train.program import build_program

out, overrides = pathlib.Path(sys.argv[1]), sys.argv[2:]
keep = {}
code = cli.train(load_config("tiny", overrides), "h100", find_batch=False, dump_top=5, keep=keep)
compiled = keep["compiled"]
(out / "step.hlo").write_text(compiled.as_text())
memory = compiled.memory_analysis()
# the control: the CPU kernels, forced on the same GPU, do show in the program's names
forced = build_program(load_config("tiny", [*overrides, "train.kernels=cpu"]), keep["program"].mesh, abstract=True)
forced_text = forced.step.lower(*forced.abstract_arguments()).as_text(debug_info=True)
(out / "facts.json").write_text(json.dumps({
    "code": code, "kernels": keep["program"].modules.kernels.name, "cost_analysis": compiled.cost_analysis(),
    "memory": [memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
               memory.temp_size_in_bytes, memory.generated_code_size_in_bytes],
    "forced_shows_cpu_scope": f"/{kernels.CPU_SCOPE}/" in forced_text,
}))
"""


def test_h100_step_is_the_gpu_program_and_reports_its_memory_and_the_cpu_lowerings_flops(gpu_env, tmp_path):
    """One compile for one H100 (2 images): the accelerator program (the GAN's two lax.cond
    branches, none of the CPU kernels), HBM figures from its memory analysis against 75% of
    the GPU's memory, FLOPs equal to XLA's count of the same step lowered for one CPU device,
    read here directly, and --dump-top's listing of the compiled GPU program."""
    done = run(["-c", _STEP, str(tmp_path), *TINY, "train.batch_size=2"], gpu_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert our_stderr(done.stderr) == []
    facts = json.loads((tmp_path / "facts.json").read_text())
    figures = last_json(done.stdout)
    assert facts["code"] == 0 and facts["kernels"] == kernels.GPU.name
    assert facts["cost_analysis"] is None  # why the FLOPs come from elsewhere
    hlo = (tmp_path / "step.hlo").read_text()
    assert hlo.count(" conditional(") >= 2  # the generator's GAN term and the discriminator update
    assert "conv_general_dilated" in hlo  # op metadata names the JAX operations ...
    assert f"/{kernels.CPU_SCOPE}/" not in hlo  # ... and none is a CPU kernel's
    assert facts["forced_shows_cpu_scope"]

    arguments, outputs, aliased, temporaries, code = facts["memory"]
    h100 = topology.CHIPS["h100"]
    assert (figures["platform"], figures["topology"], figures["chips"], figures["batch_per_chip"]) == (
        "gpu",
        "h100",
        1,
        2,
    )
    assert figures["hbm_temporaries"] == temporaries and figures["hbm_arguments_allocated"] == arguments
    assert figures["hbm_total"] == arguments + outputs - aliased + temporaries + code
    assert figures["device_memory"] == h100.hbm_bytes and figures["memory_fraction"] == 0.75
    assert figures["hbm_capacity"] == int(0.75 * h100.hbm_bytes) and figures["fits"]
    assert figures["kernels"] == "gpu" and figures["bytes_per_image"] is None and figures["bound"] == "compute only"

    one_cpu = parallel.make_mesh(1, 1, devices=jax.devices("cpu")[:1])
    program = build_program(tiny("train.batch_size=2", "train.kernels=gpu"), one_cpu, abstract=True)
    lowered = program.step.lower(*program.abstract_arguments()).cost_analysis()
    assert figures["flops_per_image"] * 2 == pytest.approx(lowered["flops"], rel=1e-12)
    assert figures["flops_source"] == dry_run.LOWERED_ON_CPU
    assert figures["roofline_images_per_s_per_chip"] == pytest.approx(h100.bf16_flops / figures["flops_per_image"])
    for words in (
        "HBM per GPU",
        "2 images per GPU",
        "75% of the GPU's 79.11 GiB",
        "XLA_CLIENT_MEM_FRACTION",
        "fits",
        "GFLOP (XLA's count",
        "images/s per GPU at the compute peak alone",
        "HBM traffic per device: no cost analysis from this compiler",
        "the 5 operations that move the most",
    ):
        assert words in done.stdout, words


def test_node_of_eight_h100s_reports_figures_through_train_py(gpu_env):
    done = run(
        [
            "-m",
            "sigmavae_jax.cli.train",
            "--config",
            "tiny",
            "--dry-run",
            "--topology",
            "8xh100",
            *TINY,
            "train.batch_size=16",
        ],
        gpu_env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = last_json(done.stdout)
    assert (figures["topology"], figures["chips"], figures["hosts"], figures["batch_per_chip"]) == ("8xh100", 8, 1, 2)
    assert figures["fits"] and figures["flops_per_image"] > 0 and figures["roofline_images_per_s_per_chip"] > 0
    assert set(figures["hbm_arguments"]) >= {"parameters", "optimizer state", "EMA", "discriminator", "LPIPS"}
    assert "compiling the train step for 8xh100 (8 GPUs, 1 node)" in done.stdout
    assert "8 x NVIDIA H100 80GB" in done.stdout and "HBM per GPU" in done.stdout


def test_a_step_that_does_not_fit_a_gpu_exits_4_and_says_what_to_change(gpu_env):
    """512 x 512 images, 32 per GPU (no LPIPS, to compile sooner): the tiny model's attention
    needs about 100 GiB. The GPU compiler does not refuse it (it rematerialises what it can and
    reports the rest); the memory analysis against the capacity says it does not fit. With
    XLA_CLIENT_MEM_FRACTION set, the capacity is that share of the GPU."""
    done = run(
        [
            "-m",
            "sigmavae_jax.cli.train",
            "--config",
            "tiny",
            "--dry-run",
            "--topology",
            "h100",
            "train.image_size=512",
            "train.batch_size=32",
            "train.compute_dtype=bfloat16",
            "loss.perceptual_weight=0",
        ],
        {**gpu_env, "XLA_CLIENT_MEM_FRACTION": "0.5"},
    )
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-3000:]
    figures = last_json(done.stdout)
    assert not figures["fits"] and figures["hbm_total"] > figures["hbm_capacity"]
    assert figures["hbm_capacity"] == int(0.5 * topology.CHIPS["h100"].hbm_bytes) and figures["memory_fraction"] == 0.5
    assert "does not fit" in done.stdout
    err = our_stderr(done.stderr)
    # besides ours, only XLA's own log lines (its rematerialisation says what it could not save)
    ours = [line for line in err if not re.match(r"[IWE]\d{4} ", line)]
    assert len(ours) == 1 and ours[0].startswith("error: the step does not fit in NVIDIA H100 80GB HBM"), err
    for hint in ("train.batch_size", "--find-batch", "train.remat=true", "XLA_CLIENT_MEM_FRACTION=0.9", "now 0.5"):
        assert hint in ours[0], hint


def test_eval_dry_run_on_a_gpu_reports_encode_and_decode(gpu_env):
    done = run(
        [
            "-m",
            "sigmavae_jax.cli.eval",
            "--dry-run",
            "--topology",
            "2xh200",
            "--config",
            "tiny",
            "--size",
            str(SIZE),
            "--batch-size",
            "8",
            "--dtype",
            "bfloat16",
        ],
        gpu_env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = last_json(done.stdout)
    for name in ("encode", "decode"):
        assert figures[name]["fits"] and figures[name]["batch_per_chip"] == 4 and figures[name]["kernels"] == "gpu"
        assert figures[name]["flops_source"] == dry_run.LOWERED_ON_CPU and figures[name]["flops_per_image"] > 0
        assert figures[name]["hbm_capacity"] == int(0.75 * topology.CHIPS["h200"].hbm_bytes)
    assert figures["decode"]["flops_per_image"] > figures["encode"]["flops_per_image"]


def test_without_the_plugin_a_gpu_topology_is_one_line_naming_the_extra():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for args in (
        ["-m", "sigmavae_jax.cli.train", "--config", "tiny", "--dry-run", "--topology", "8xh100"],
        ["-m", "sigmavae_jax.cli.eval", "--dry-run", "--topology", "h100", "--config", "tiny"],
    ):
        done = run(args, {**env, "JAX_PLATFORMS": "cpu"})
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
        assert err[0].startswith("error: cannot describe GPUs") and "pip install -e '.[gpu]'" in err[0]


def test_find_batch_on_gpus_searches_memory_only_then_counts_the_flops_of_the_largest(monkeypatch, capsys):
    """The search compiles without FLOPs (compiles replaced by a rule: up to 12 images per GPU
    fit); the reported batch then gets the FLOPs of its CPU lowering."""
    asked = []

    def fake_report(cfg, gpu_slice, keep=None, flops=True):
        per_gpu = cfg.train.batch_size // gpu_slice.chips
        asked.append((per_gpu, flops))
        return dry_run.Report(
            "train step",
            gpu_slice,
            per_gpu,
            {"parameters": 2**20},
            total=(1 + per_gpu) * 2**30,
            fits=per_gpu <= 12,
            flops_per_image=None,
            kernels="gpu",
        )

    monkeypatch.setattr(dry_run, "train_step_report", fake_report)
    code = train_cli.main(
        ["--config", "tiny", "--dry-run", "--topology", "8xh100", "--find-batch", *TINY, "train.batch_size=64"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert {flops for _, flops in asked} == {False} and asked[0][0] == 8 and 13 in dict(asked)
    figures = last_json(out)
    assert figures["max_batch_per_chip"] == 12 and figures["max_global_batch"] == 96 and figures["batch_per_chip"] == 12
    want = dry_run.step_flops_on_one_cpu(tiny("train.batch_size=96"), 12, kernels.GPU) / 12
    assert figures["flops_per_image"] == pytest.approx(want) and figures["flops_source"] == dry_run.LOWERED_ON_CPU
    assert "largest batch that fits: 12 per GPU (train.batch_size=96)" in out and "images per GPU" in out
