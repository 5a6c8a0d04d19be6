"""Test setup: highest matmul precision for parity, the persistent compilation cache, tiny reference models."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "molmo2-jax" / "jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session", params=["qwen3", "olmo3"])
def reference(request, tmp_path_factory):
    """(family, torch reference model, directory of its save_pretrained checkpoint)."""
    from ref_model import make_reference

    path = tmp_path_factory.mktemp(f"ref_{request.param}")
    return request.param, make_reference(path, request.param), path
