"""Reuse freed host memory when JAX runs on the CPU (glibc's malloc only).

XLA:CPU allocates each execution's temporaries as one block (about 2 GB for a 65M-parameter train step on one
image) and frees it at the end. glibc serves a block that large with a fresh `mmap` and unmaps it on free, so
every step faults its pages in again: about 510k page faults, 0.5-3 s of a 5-6 s step on a 2-core machine, the
most when another library's memory churns in between (docs/performance.md). So, where JAX will run on the CPU:
- malloc serves large blocks from the heap and never trims it (`M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` infinite), so
  the next execution reuses the block's pages; the process keeps its peak heap;
- XLA executes on the calling thread (`jax_cpu_enable_async_dispatch` off): only the main arena obeys the first
  setting, a thread's own arena still maps large blocks (glibc 2.35+). Python no longer runs ahead of the
  computation; a Grain pipeline prefetches in its own workers anyway;
- inputs just copied to the device are waited for before a call (`placed`): an execution whose inputs are still
  being copied starts on the copying thread when they arrive, so its temporaries come from that thread's arena
  (a 65M train step on a fresh batch faulted 510k pages a step in 4 of 5 runs without the wait, 0 with it).

Applied when `molmo2_jax` is imported, before JAX starts its CPU backend, only where JAX will run on the CPU (no
accelerator plugin installed, or `JAX_PLATFORMS=cpu`). A `glibc.malloc` tunable in `GLIBC_TUNABLES` leaves both
alone, `JAX_CPU_ENABLE_ASYNC_DISPATCH` in the environment the dispatch.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, TypeVar

import jax

if TYPE_CHECKING:
    from molmo2_jax.config import VisionConfig

T = TypeVar("T")

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

_reusing = False  # whether reuse_freed_memory configured malloc in this process

# The largest heap of a thread's own malloc arena (glibc's HEAP_MAX_SIZE on 64-bit): a block above it is mapped
# afresh, and faulted in, every time, whatever the settings here. XLA's kernels allocate some of their own
# intermediates on worker threads (docs/performance.md): `crops_within_thread_heap` sizes the ViT's by it.
THREAD_HEAP_BYTES = 64 << 20


def runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU, judged without starting a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # libtpu, or a PJRT plugin (CUDA, ROCm) registered the way jax discovers them
    return importlib.util.find_spec("libtpu") is None and not importlib.metadata.entry_points(group="jax_plugins")


def reuse_freed_memory() -> bool:
    """Configure malloc and the CPU dispatch as the module docstring says; whether malloc was configured."""
    if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not runs_on_cpu():
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    global _reusing
    # -1 is SIZE_MAX to mallopt's size_t threshold: never trim
    _reusing = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _reusing


def placed(tree: T) -> T:
    """`tree` (arrays just put on the device) once its copies are done, where freed memory is reused; unchanged
    elsewhere (on an accelerator the copies overlap the running step)."""
    return jax.block_until_ready(tree) if _reusing else tree


def trim() -> None:
    """Give the heap's free memory back to the system now (glibc's `malloc_trim`), where freed memory is reused:
    e.g. after compiling, whose peak the process would otherwise keep resident. The next execution faults in
    what it needs again."""
    if _reusing:
        ctypes.CDLL(None).malloc_trim(0)


def reusing() -> bool:
    """Whether `reuse_freed_memory` configured malloc in this process (JAX on the CPU, glibc, no opt-out)."""
    return _reusing


def crops_within_thread_heap(vision: VisionConfig) -> int:
    """Crops per ViT call whose widest activation, `[crops * patches, max(MLP, q/k/v width)]` in fp32 (what a
    product accumulates in), takes at most 3/4 of a thread's heap; at least 1."""
    width = max(vision.intermediate_size, 3 * vision.hidden_size)
    return max(1, THREAD_HEAP_BYTES * 3 // 4 // (vision.num_patches * width * 4))
