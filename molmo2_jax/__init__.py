"""Molmo2 vision-language models in JAX/Flax."""

from molmo2_jax import host_memory

host_memory.reuse_freed_memory()  # before JAX starts its CPU backend (see the module)

from molmo2_jax.api import InputError, Molmo2Model, load  # noqa: E402
from molmo2_jax.checkpoint.hf import CheckpointError  # noqa: E402
from molmo2_jax.config import ConfigError, Molmo2Config  # noqa: E402
from molmo2_jax.errors import Molmo2Error  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "InputError", "Molmo2Config", "Molmo2Error", "Molmo2Model", "load"]
