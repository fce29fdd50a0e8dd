"""Benchmark of building models under a trace (run by `make bench`; prints figures, ends with
one JSON line).

What every train.py start, dry run and `load` does before compiling: the abstract module graph
(`nnx.eval_shape`) and a train state's shapes (`jax.eval_shape` of the init). Timed, turn by turn
in one process, with `models.init_rngs` (what the package uses) against flax's `nnx.Rngs` (the
baseline), for the tiny, SD and NextStep-1 configs.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from unittest import mock

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import alternate  # noqa: E402
from flax import nnx  # noqa: E402

from sigmavae_jax import kernels, topology  # noqa: E402
from sigmavae_jax.config import load_config  # noqa: E402
from sigmavae_jax.train import state as train_state  # noqa: E402

CONFIGS = ("tiny", "sd", "nextstep1_f8c16")


def build(cfg) -> None:
    modules = train_state.build_structure(cfg, kernels.XLA)
    train_state.state_shapes(cfg, modules)


def with_nnx_rngs(cfg) -> None:
    with mock.patch.object(train_state, "init_rngs", nnx.Rngs):
        build(cfg)


def main() -> None:
    topology.quiet_libtpu_on_a_host_without_tpu()
    results = {}
    for name in CONFIGS:
        cfg = load_config(name)
        ours, flax_rngs = alternate(functools.partial(build, cfg), functools.partial(with_nnx_rngs, cfg), repeats=3)
        results[name] = {"init_rngs_s": ours, "nnx_rngs_s": flax_rngs, "speedup": flax_rngs / ours}
        print(f"{name}: structure + state shapes {ours:.2f} s with init_rngs, {flax_rngs:.2f} s with nnx.Rngs")
    print(json.dumps({f"{name}_build_speedup": round(r["speedup"], 2) for name, r in results.items()}))


if __name__ == "__main__":
    main()
