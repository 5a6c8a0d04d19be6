"""`python convert/hf_to_jax.py ARGS` is `molmo2-jax convert ARGS` (see `molmo2-jax convert --help`)."""

import sys

from molmo2_jax.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
