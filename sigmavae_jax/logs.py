"""Logging for the command lines: this package's messages from INFO up, other libraries'
(Orbax, grain, JAX) from WARNING up unless `verbose`, all in one format on stderr."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup(*, verbose: bool = False) -> None:
    """Configures the root logger (replacing what imported libraries may have set: absl, via
    grain, installs its own) and this package's level."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT, force=True)
    logging.getLogger("sigmavae_jax").setLevel(logging.INFO)
