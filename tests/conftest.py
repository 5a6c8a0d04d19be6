"""Test setup: highest matmul precision for parity, the persistent compilation cache, tiny reference models."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from jax_setup import configure  # noqa: E402

configure()


@pytest.fixture(scope="session", params=["qwen3", "olmo3"])
def reference(request, tmp_path_factory):
    """(family, torch reference model, directory of its save_pretrained checkpoint)."""
    from ref_model import make_reference

    path = tmp_path_factory.mktemp(f"ref_{request.param}")
    return request.param, make_reference(path, request.param), path
