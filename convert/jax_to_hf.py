"""`python convert/jax_to_hf.py ARGS` is `molmo2-jax export ARGS` (see `molmo2-jax export --help`)."""

import sys

from molmo2_jax.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
