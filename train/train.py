"""`python train/train.py ARGS` is `molmo2-jax train ARGS` (see `molmo2-jax train --help`)."""

import sys

from molmo2_jax.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
