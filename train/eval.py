"""`python train/eval.py ARGS` is `molmo2-jax eval-synthetic ARGS` (see `molmo2-jax eval-synthetic --help`)."""

import sys

from molmo2_jax.cli import main

sys.exit(main(["eval-synthetic", *sys.argv[1:]]))
