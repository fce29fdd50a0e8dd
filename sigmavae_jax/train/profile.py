"""A profiler trace of a few training steps (`log.profile_at`, `log.profile_steps`), for
TensorBoard's profile tab or Perfetto.

Every process traces the same steps with `jax.profiler` into a local temporary folder and then
copies the files into `workdir/tensorboard/plugins/profile/steps_A-B/` (local or `gs://`), one
`process_N.xplane.pb` and `process_N.trace.json.gz` per process, where `tensorboard --logdir
workdir/tensorboard` finds them next to the scalars. The trace covers the steps' device work:
the last traced step is waited for before the trace stops.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile
from typing import Any

import jax

from sigmavae_jax import storage

log = logging.getLogger(__name__)


class StepProfiler:
    """Traces steps `first` .. `first + count - 1` (1-based, as checkpoints count steps); `first`
    None traces nothing. Call `before(step)` before dispatching step `step`, `after(step, out)`
    once it is dispatched, and `close()` at the end (on errors too): a trace still running is
    stopped there and its files are kept."""

    def __init__(self, workdir: storage.Path, first: int | None, count: int):
        self.workdir, self.first, self.last = workdir, first, None if first is None else first + count - 1
        self.local: pathlib.Path | None = None
        self.traced_to: int | None = None  # the last step dispatched while tracing

    def before(self, step: int) -> None:
        if step == self.first and self.local is None:
            self.local = pathlib.Path(tempfile.mkdtemp(prefix="sigmavae_profile_"))
            jax.profiler.start_trace(str(self.local))
            log.info("profiling steps %d-%d", self.first, self.last)

    def after(self, step: int, outputs: Any) -> None:
        if self.local is not None:
            self.traced_to = step
            if step >= self.last:
                jax.block_until_ready(outputs)  # the trace holds the last step's device work too
                self._finish()

    def close(self) -> None:
        if self.local is not None:
            self._finish()

    def _finish(self) -> None:
        local, self.local, step = self.local, None, self.traced_to
        try:
            jax.profiler.stop_trace()
            files = sorted(p for p in local.glob("plugins/profile/*/*") if p.is_file())
            target = self.workdir / "tensorboard" / "plugins" / "profile" / f"steps_{self.first}-{step}"
            target.mkdir(parents=True, exist_ok=True)
            for source in files:
                # jax names the files after the host; processes sharing a host would overwrite each other
                kind = source.name.split(".", 1)[1]
                (target / f"process_{jax.process_index()}.{kind}").write_bytes(source.read_bytes())
            if jax.process_index() == 0:
                log.info(
                    "profile of steps %d-%d in %s (TensorBoard's profile tab: pip install tensorboard-plugin-profile; "
                    "or the .trace.json.gz in https://ui.perfetto.dev)",
                    self.first,
                    step,
                    target,
                )
        finally:
            shutil.rmtree(local, ignore_errors=True)
