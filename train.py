#!/usr/bin/env python
"""Train or fine-tune a Sigma-VAE: `python train.py --config configs/X.yaml [key=value ...]`.

The command line is `sigmavae_jax.cli.train` (installed as `sigmavae-train`); --help lists every config key.
"""

import sys

from sigmavae_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
