#!/usr/bin/env python
"""Evaluate a VAE's reconstructions: rFID, PSNR, SSIM, LPIPS (DESIGN section 9).

The command line is `sigmavae_jax.cli.eval` (installed as `sigmavae-eval`); --help lists the options.
"""

import sys

from sigmavae_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
