"""`python convert/verify.py ARGS` is `molmo2-jax verify ARGS` (see `molmo2-jax verify --help`)."""

import sys

from molmo2_jax.cli import main

sys.exit(main(["verify", *sys.argv[1:]]))
