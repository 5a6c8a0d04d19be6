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


# A fresh batch put on the device before each call, as TrainStep.step and Molmo2Model.prepare do, then a call with a
# 64 MiB temporary; prints the page faults of calls 2 to 6. Without the wait for the copies (`placed`) the call
# often runs on the thread that finished them, whose malloc arena maps the temporary afresh every time.
FRESH_BATCH_SCRIPT = """
import resource
import numpy as np
import molmo2_jax
from molmo2_jax import host_memory
import jax, jax.numpy as jnp

f = jax.jit(lambda b, w: jnp.tanh(b["x"] @ w).sum() + b["i"].sum())
batch = {"x": np.full((1024, 2048), 1e-3, np.float32), "i": np.arange(1000)}
w = jnp.full((2048, 16384), 1e-3, jnp.float32)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(host_memory.placed(jax.device_put(batch)), w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[1:])
"""


# 256 MiB of heap freed, then given back: prints the resident MiB before the allocation, after freeing it and after
# `trim`.
TRIM_SCRIPT = """
import re
import numpy as np
import molmo2_jax
from molmo2_jax import host_memory

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

start = rss()
x = np.ones(64 << 20, np.float32)
del x
kept = rss()
host_memory.trim()
print(start, kept, rss())
"""


def printed_by(script: str, **env) -> list[int]:
    """The integers `script` prints on its last line, run in a fresh Python with `env` (and none of our knobs)."""
    drop = ("GLIBC_TUNABLES", "JAX_PLATFORMS", "JAX_CPU_ENABLE_ASYNC_DISPATCH", "XLA_FLAGS")
    environ = {k: v for k, v in os.environ.items() if k not in drop} | env
    out = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.splitlines()[-1].split()]


def second_call_faults(**env) -> int:
    return printed_by(SCRIPT, **env)[-1]


def test_temporaries_reuse_their_pages_on_cpu():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert second_call_faults(JAX_PLATFORMS="cpu") < pages // 10
    # left alone (the user's own malloc tunables): the temporaries are mapped afresh and faulted in again
    assert second_call_faults(JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.tcache_count=7") > pages // 2


def test_a_fresh_batch_does_not_move_the_call_off_the_reusing_thread():
    # the race goes one way or the other per process (2 of 3 runs faulted every call without the wait): two runs.
    # Each call may fault in the batch's own new 8 MiB copy, not the temporary's 64 MiB.
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    for _ in range(2):
        assert max(printed_by(FRESH_BATCH_SCRIPT, JAX_PLATFORMS="cpu")) < pages // 4


def test_trim_gives_the_kept_heap_back():
    start, kept, trimmed = printed_by(TRIM_SCRIPT, JAX_PLATFORMS="cpu")
    assert kept - start > 200  # freed, but kept resident for reuse
    assert trimmed - start < 50


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    for platforms, cpu in (("cpu", True), ("cpu,tpu", True), ("tpu,cpu", False), ("cuda", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_memory.runs_on_cpu() is cpu, platforms
