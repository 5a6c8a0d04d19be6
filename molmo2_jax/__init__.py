"""Molmo2 vision-language models in JAX/Flax."""

from molmo2_jax.api import InputError, Molmo2Model, load
from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.config import ConfigError, Molmo2Config
from molmo2_jax.errors import Molmo2Error

__all__ = ["CheckpointError", "ConfigError", "InputError", "Molmo2Config", "Molmo2Error", "Molmo2Model", "load"]
