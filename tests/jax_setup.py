"""The suite's JAX settings: highest matmul precision (parity tests compare float32 to 1e-5) and the persistent
compilation cache. Test scripts that run in a subprocess call `configure(devices=N)` before JAX's backend starts, to
simulate N CPU devices (the count is fixed once a device has been used)."""

from __future__ import annotations

from pathlib import Path


def configure(devices: int | None = None):
    """Apply the settings (and the simulated device count); returns the `jax` module."""
    import jax

    if devices is not None:
        jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "molmo2-jax" / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return jax
