"""molmo2_jax/host_memory.py: on the CPU, a jitted function's temporaries reuse the pages of the previous call's
instead of faulting fresh ones in (what cost a 65M train step about 510k page faults)."""

import os
import subprocess
import sys

import pytest

from molmo2_jax import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# A function with a 64 MiB temporary (`x @ x.T`, above glibc's largest mmap threshold), called twice; prints the
# page faults of the second call.
SCRIPT = """
import resource
import molmo2_jax
import jax, jax.numpy as jnp

f = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum())
x = jnp.full((4096, 2048), 1e-3, jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_call_faults(**env) -> int:
    drop = ("GLIBC_TUNABLES", "JAX_PLATFORMS", "JAX_CPU_ENABLE_ASYNC_DISPATCH", "XLA_FLAGS")
    environ = {k: v for k, v in os.environ.items() if k not in drop} | env
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=environ, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_temporaries_reuse_their_pages_on_cpu():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert second_call_faults(JAX_PLATFORMS="cpu") < pages // 10
    # left alone (the user's own malloc tunables): the temporaries are mapped afresh and faulted in again
    assert second_call_faults(JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.tcache_count=7") > pages // 2


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    for platforms, cpu in (("cpu", True), ("cpu,tpu", True), ("tpu,cpu", False), ("cuda", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_memory.runs_on_cpu() is cpu, platforms
