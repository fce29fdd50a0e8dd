#!/usr/bin/env python
"""Convert PyTorch AutoencoderKL weights (SD, SDXL, FLUX, NextStep-1) for sigmavae_jax.

The command line is `sigmavae_jax.cli.convert` (installed as `sigmavae-convert`); run with --help for examples.
"""

import sys

from sigmavae_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
