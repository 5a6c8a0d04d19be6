"""Hugging Face Molmo2 checkpoint -> our converted format, streamed with bounded memory.

Each stacked param is filled layer by layer into a memory-mapped scratch file (file-backed pages the kernel
can write back and drop), and the Orbax checkpoint is written from those maps in small chunks. Anonymous
memory therefore depends on the largest single tensor, not on the model size: at most a few copies of it while
it is converted (for the embedding table: its two HF pieces, their concatenation, a dtype copy) plus a
constant. The scratch files need as much free disk as the converted params and are deleted before the result
is moved into place; both are checked against the free space before anything is written, and each scratch file
is allocated on disk before it is mapped (a sparse map on a full disk would kill the process with SIGBUS).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from molmo2_jax.checkpoint import converted, hf
from molmo2_jax.checkpoint.formats import HF, open_checkpoint
from molmo2_jax.checkpoint.storage import check_free_space, reporting_write_errors, size_text
from molmo2_jax.checkpoint.table import RELEASED, active_rules
from molmo2_jax.config import Molmo2Config
from molmo2_jax.params import param_shapes

SCRATCH_DIR = ".scratch"


def convert_hf_to_jax(src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False,
                      log: Callable[[str], None] | None = print) -> Molmo2Config:
    """Convert the HF checkpoint directory `src` (released or transformers-native names) into `dst`.

    Writes `molmo2_jax_config.json`, the Orbax `params/` tree (in `dtype`) and the tokenizer/processor files
    `src` has. Raises `CheckpointError` (nothing written at `dst`) for a source that is not a Molmo2 checkpoint
    or does not match its config, and `FileExistsError` for a non-empty `dst` without `overwrite`.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in hf.DTYPES:
        raise hf.CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(hf.DTYPES)}")
    checkpoint = open_checkpoint(src)
    if checkpoint.kind != HF:
        raise hf.CheckpointError(f"{src}: a {checkpoint.kind} checkpoint, which needs no conversion (`molmo2_jax.load` "
                                 "and `molmo2-jax export` read it); convert reads Hugging Face directories")
    config = checkpoint.config.replace(dtype=dtype, param_dtype=dtype)
    converted.prepare_destination(dst, overwrite)
    shapes = param_shapes(config)
    say = log or (lambda message: None)
    total = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(hf.DTYPES[dtype]).itemsize
    check_free_space(dst.parent, 2 * total, f"the conversion (params and their scratch copy, {size_text(total)} each)")

    def fill(tmp: Path) -> None:
        scratch = tmp / SCRATCH_DIR
        scratch.mkdir()
        maps = _ScratchMaps(scratch)
        meter = _Meter(say, total, len(shapes))
        say(f"reading {src} ({len(shapes)} params, {meter.total / 1e9:.2f} GB as {dtype})")
        flat = hf.import_params(src, config, shapes, dtype=dtype, place=maps.place, allocate=maps.allocate,
                                progress=lambda path: meter.step(path, maps.nbytes(path)))
        say(f"writing Orbax checkpoint {dst / converted.PARAMS_DIR}")
        start = time.perf_counter()
        converted.save_host_params(tmp, flat, stacked=_stacked_params(config))
        seconds = time.perf_counter() - start
        say(f"wrote {meter.total / 1e9:.2f} GB in {seconds:.1f} s ({meter.total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
        del flat
        maps.remove()
        converted.write_config(tmp, config)
        copied = converted.copy_side_files(src, tmp)
        if copied:
            say(f"copied {', '.join(copied)}")

    with reporting_write_errors(dst, "the conversion"):
        converted.write_atomically(dst, overwrite, fill)
    say(f"done: {dst}")
    return config


def _stacked_params(config: Molmo2Config) -> set[str]:
    return {p for rule in active_rules(RELEASED, config) if rule.layers for p in rule.params}


class _ScratchMaps:
    """One memory-mapped scratch file per param."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.maps: dict[str, np.memmap] = {}

    def allocate(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        file = self.directory / path.replace("/", ".")
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        with open(file, "wb") as f:  # real blocks: a full disk raises ENOSPC here, not SIGBUS on a page write
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:  # macOS: a sparse file, covered by the free-space check alone
                f.truncate(nbytes)
        mapped = np.memmap(file, dtype=dtype, mode="r+", shape=shape)
        self.maps[path] = mapped
        return mapped

    def place(self, path: str, value: np.ndarray) -> np.memmap:
        """The param's map, holding `value` (unstacked params arrive as fresh arrays, stacked ones in place)."""
        mapped = self.maps[path]
        if value is not mapped:
            mapped[...] = value
        mapped.flush()
        return mapped

    def nbytes(self, path: str) -> int:
        return self.maps[path].nbytes

    def remove(self) -> None:
        self.maps.clear()
        for file in self.directory.iterdir():
            file.unlink()
        self.directory.rmdir()


class _Meter:
    """Progress lines: params done, bytes, throughput."""

    def __init__(self, say: Callable[[str], None], total: int, count: int, every: float = 2.0):
        self.say, self.total, self.count, self.every = say, total, count, every
        self.done_bytes = self.done = 0
        self.start = self.last = time.perf_counter()

    def step(self, path: str, nbytes: int) -> None:
        self.done += 1
        self.done_bytes += nbytes
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.count:
            self.last = now
            rate = self.done_bytes / 1e6 / max(now - self.start, 1e-9)
            self.say(f"  [{self.done}/{self.count}] {self.done_bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                     f"{rate:.0f} MB/s  {path}")
