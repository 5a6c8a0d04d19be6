"""Molmo2 vision-language models in JAX/Flax."""

from molmo2_jax.api import InputError, Molmo2Model, load
from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.config import ConfigError, Molmo2Config

__all__ = ["CheckpointError", "ConfigError", "InputError", "Molmo2Config", "Molmo2Model", "load"]
