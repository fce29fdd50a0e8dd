"""One process of a multi-process training run that counts its host collectives.

    python tests/collectives_driver.py OUT.json COORDINATOR NUM_PROCESSES PROCESS_ID key=value ...

Joins the run like `train.py --coordinator ...`, then wraps every way this process can wait
for the others: the `jax.experimental.multihost_utils` collectives (what our code and Orbax
call) and every method of the `jax.distributed` client (barriers and key-value waits, which
Orbax also calls directly). Each call adds one to a counter. JAX's preemption sync point,
which the loop asks once per step, is wrapped too, to note the counter at each step: the
counter must not move between two ordinary steps. Writes
    {"process": i, "marks": [[step, count], ...], "calls": {name: n}, "step": ..., "reason": ..., "export": ...}
to OUT.json. The training itself is the product's `sigmavae_jax.train.loop.train`, untouched.
"""

from __future__ import annotations

import collections
import json
import sys


class CountingClient:
    """Stands in for the jax.distributed client: counts each method call, then delegates."""

    def __init__(self, client, calls: collections.Counter):
        self._client, self._calls = client, calls

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self._calls[f"client.{name}"] += 1
            return attribute(*args, **kwargs)

        return counted


def main(out: str, coordinator: str, num_processes: str, process_id: str, *overrides: str) -> None:
    from sigmavae_jax import parallel

    parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))

    import jax
    from jax._src import distributed
    from jax.experimental import multihost_utils

    # The CPU client (with its gloo collectives) is built now, around the real distributed
    # client; only Python-level users see the counting stand-in installed below.
    jax.devices()
    calls: collections.Counter = collections.Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all", "assert_equal"):
        setattr(multihost_utils, name, counted(name, getattr(multihost_utils, name)))
    distributed.global_state.client = CountingClient(distributed.global_state.client, calls)

    marks = []
    sync_point = multihost_utils.reached_preemption_sync_point

    def reached_preemption_sync_point(step):
        marks.append([int(step), sum(calls.values())])
        return sync_point(step)

    multihost_utils.reached_preemption_sync_point = reached_preemption_sync_point

    from sigmavae_jax.config import load_config
    from sigmavae_jax.train.loop import train

    result = train(load_config("tiny", list(overrides)), show_progress=False)
    with open(out, "w") as file:
        json.dump(
            {
                "process": jax.process_index(),
                "marks": marks,
                "calls": dict(calls),
                "step": result.step,
                "reason": result.reason,
                "export": str(result.export),
            },
            file,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
