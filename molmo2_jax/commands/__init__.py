"""Subcommands of the `molmo2-jax` command (see molmo2_jax/cli.py)."""
