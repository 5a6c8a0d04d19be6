"""Our checkpoints -> a Hugging Face Molmo2 checkpoint in the released layout, streamed tensor by tensor.

Sources: any checkpoint `formats.open_checkpoint` recognises; of a training checkpoint only the `params` subtree of
its Orbax `state/` item is read, never the optimizer state. Orbax params are read through tensorstore one layer
slice at a time, converted by the declarative table (`hf.export_tensors`) and appended to safetensors shards of at
most `max_shard_bytes`, so memory stays near one tensor plus a constant (a Hugging Face source is imported whole
first). Output: the shards, `model.safetensors.index.json`, the released-form
`config.json` and the tokenizer/processor files of the source. Nothing appears at the destination unless the
whole export succeeds.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from molmo2_jax.checkpoint import converted, hf
from molmo2_jax.checkpoint.formats import HF, TRAINING, Checkpoint, open_checkpoint
from molmo2_jax.checkpoint.storage import check_free_space, reporting_write_errors
from molmo2_jax.checkpoint.table import RELEASED, active_rules, layer_count
from molmo2_jax.config import Molmo2Config, to_hf_config
from molmo2_jax.params import param_shapes

MAX_SHARD_BYTES = 5 * 10**9  # the usual Hugging Face shard limit ("5GB")
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# A stacked param whose storage chunks are at most this big is read one layer at a time; a coarsely chunked one
# (e.g. a whole-array chunk) is read once, as re-decoding a big chunk per layer would be slow.
_LAZY_CHUNK_BYTES = 64 << 20


def export_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False,
                 step: int | None = None, side_files_from: str | Path | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES, log: Callable[[str], None] | None = print) -> list[str]:
    """Export the checkpoint `src` (any format) to the HF directory `dst`; returns the shard names.

    `step` picks a step of a training run directory (default: the latest). Tokenizer and processor files are
    copied from `side_files_from` when given, else from the source (and a training run's directory, and the
    directories the run took its vocabulary and processor from: `model.vocab_from`, `data.processor_dir`).
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()  # TensorStore resolves relative paths differently
    say = log or (lambda message: None)
    if dtype not in _SAFETENSORS_DTYPES:
        raise hf.CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(_SAFETENSORS_DTYPES)}")
    source = ParamSource.open(src, step)
    if side_files_from is not None:
        side_dirs = [Path(side_files_from)]
        if not side_dirs[0].is_dir():
            raise hf.CheckpointError(f"{side_dirs[0]}: directory to copy tokenizer files from does not exist")
    else:
        side_dirs = source.side_dirs + _run_side_dirs(source)
    if not any((d / name).is_file() for d in side_dirs for name in converted.SIDE_FILES):
        say(f"note: {src} has no tokenizer or processor files; the export will have none (pass --tokenizer-from DIR "
            "to add them)")
    converted.prepare_destination(dst, overwrite)
    config = source.config
    itemsize = np.dtype(hf.DTYPES[dtype]).itemsize
    check_free_space(dst.parent, sum(math.prod(s) for s in param_shapes(config).values()) * itemsize, "the export")
    say(f"exporting {source.where} to {dst} as {dtype}")

    def fill(tmp: Path) -> list[str]:
        start = time.perf_counter()
        writer = ShardWriter(tmp, _tensor_names(config), max_shard_bytes)
        for name, array in hf.export_tensors(source.get, config, dtype):
            writer.add(name, array)
            del array  # not alive while the next tensor is read
            writer.report(say)
        shards = writer.finish()
        seconds = time.perf_counter() - start
        say(f"wrote {len(shards)} shard(s), {writer.total / 1e9:.2f} GB in {seconds:.1f} s "
            f"({writer.total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
        for directory in side_dirs:
            copied = converted.copy_side_files(directory, tmp)
            if copied:
                say(f"copied {', '.join(copied)} from {directory}")
        hf_config = to_hf_config(config, dtype)
        processor = tmp / "processor_config.json"
        if processor.is_file():  # the hub model code finds each frame's end by this flag: agree with the processor
            frames = _read_json(processor, processor).get("use_frame_special_tokens")
            hf_config["use_frame_special_tokens"] = hf_config["use_frame_special_tokens"] if frames is None else frames
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        return shards

    with reporting_write_errors(dst, "the export"):
        shards = converted.write_atomically(dst, overwrite, fill)
    say(f"done: {dst}")
    return shards


class ParamSource:
    """Per-param access to the params of a checkpoint: read lazily from an Orbax tree (converted or training), or
    imported into memory first from a Hugging Face directory (e.g. to re-export transformers-native names in the
    released layout)."""

    def __init__(self, checkpoint: Checkpoint):
        self.where, self.config, self.train_config = checkpoint.path, checkpoint.config, checkpoint.train_config
        # side files may sit in a training run's directory, one or two levels above the step
        self.side_dirs = (list(dict.fromkeys([self.where, self.where.parent, self.where.parent.parent,
                                              checkpoint.given])) if checkpoint.kind == TRAINING else [self.where])
        self._imported = None
        if checkpoint.kind == HF:
            self._imported = hf.import_params(self.where, self.config, param_shapes(self.config))
            return
        self.item, self.prefix = checkpoint.orbax_params
        # Few reads in flight: each holds a compressed chunk, so this bounds memory beyond the tensor itself.
        self.context = ocp.type_handlers.get_ts_context(use_ocdbt=True, file_io_concurrency_limit=4)
        metadata = _read_json(self.item / "_METADATA", self.item)
        self.use_zarr3 = bool(metadata.get("use_zarr3", False))
        self.is_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.item))
        self._check_params()

    @classmethod
    def open(cls, src: Path, step: int | None = None) -> ParamSource:
        return cls(open_checkpoint(src, step))

    def _open(self, path: str) -> ts.TensorStore:
        info = ocp.type_handlers.ParamInfo(name=self.prefix + path.replace("/", "."), parent_dir=epath.Path(self.item),
                                           is_ocdbt_checkpoint=self.is_ocdbt, use_zarr3=self.use_zarr3,
                                           ts_context=self.context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.is_ocdbt)
        return ts.open(spec, open=True, context=self.context).result()

    def _check_params(self) -> None:
        """Every param present with its config shape, before anything is written."""
        problems = []
        for path, shape in param_shapes(self.config).items():
            try:
                stored = tuple(self._open(path).shape)
            except ValueError:
                problems.append(f"{path} missing")
                continue
            if stored != shape:
                problems.append(f"{path} {list(stored)} (config says {list(shape)})")
        if problems:
            raise hf.CheckpointError(f"{self.item}: params do not match the model config: "
                                     f"{', '.join(problems[:4])}" + (f" (+{len(problems) - 4} more)"
                                                                      if len(problems) > 4 else ""))

    def get(self, path: str) -> Any:
        """The param, read chunk by chunk when indexed by layer or converted with `np.asarray` (finely chunked
        params), or at once (coarsely chunked ones)."""
        if self._imported is not None:
            return self._imported[path]
        store = self._open(path)
        chunk = store.chunk_layout.read_chunk.shape
        if chunk is not None and math.prod(chunk) * store.dtype.numpy_dtype.itemsize <= _LAZY_CHUNK_BYTES:
            return _ChunkwiseReader(store)
        return store.read().result()


class _ChunkwiseReader:
    """A stored array read one storage chunk at a time into its output, so tensorstore's transient buffers hold
    one chunk rather than a copy of the whole array."""

    def __init__(self, store: ts.TensorStore):
        self.store = store

    def __getitem__(self, index) -> _ChunkwiseReader:
        return _ChunkwiseReader(self.store[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.store.shape, self.store.dtype.numpy_dtype)
        chunk = self.store.chunk_layout.read_chunk.shape
        origin = self.store.domain.origin
        for starts in itertools.product(*(range(0, n, c) for n, c in zip(out.shape, chunk))):
            block = tuple(slice(s, s + c) for s, c in zip(starts, chunk))
            shifted = tuple(slice(o + s, o + s + c) for o, s, c in zip(origin, starts, chunk))
            out[block] = self.store[shifted].read().result()
        return out if dtype is None else out.astype(dtype, copy=False)


def _run_side_dirs(source: ParamSource) -> list[Path]:
    """The directories a training run took its tokenizer and processor from, each required to hold them."""
    if source.train_config is None:
        return []
    named = {"model.vocab_from": (source.train_config.get("model") or {}).get("vocab_from"),
             "data.processor_dir": (source.train_config.get("data") or {}).get("processor_dir")}
    dirs = []
    for key, directory in named.items():
        if not directory:
            continue
        directory = Path(directory)
        if not any((directory / name).is_file() for name in converted.SIDE_FILES):
            raise hf.CheckpointError(f"{source.where}: the run's {key} {directory} holds no tokenizer or processor "
                                     "files (is it moved?); pass --tokenizer-from DIR to take them from elsewhere")
        dirs.append(directory)
    return dirs


def _read_json(path: Path, what: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise hf.CheckpointError(f"{what}: unreadable checkpoint metadata ({e})") from None


def _tensor_names(config: Molmo2Config) -> list[str]:
    names = []
    for rule in active_rules(RELEASED, config):
        n = layer_count(rule, config)
        names += [h.format(i=i) for i in (range(n) if n is not None else [None]) for h in rule.hf]
    return names


class ShardWriter:
    """Appends tensors to safetensors files of bounded size without holding a shard in memory.

    Each file starts with a header region reserved for the longest possible header (every tensor name of the
    model, with generous room for shapes and offsets); the real header is written into it at the end, padded
    with spaces as the format allows.
    """

    def __init__(self, directory: Path, all_names: list[str], max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.header_bytes = _round8(200 + sum(len(name) + 120 for name in all_names))
        self.files: list[Path] = []
        self.entries: list[dict[str, Any]] = []
        self.handle = None
        self.offset = self.total = 0
        self.weight_map: dict[str, int] = {}
        self._last_report = time.perf_counter()
        self._start = self._last_report

    def add(self, name: str, array: np.ndarray) -> None:
        nbytes = array.nbytes
        if self.handle is not None and self.offset + nbytes > self.max_bytes:
            self._close()
        if self.handle is None:
            self.files.append(self.directory / f".shard-{len(self.files)}.tmp")
            self.handle = open(self.files[-1], "wb")
            self.handle.seek(8 + self.header_bytes)
            self.entries.append({"__metadata__": {"format": "pt"}})
        self.entries[-1][name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                                  "data_offsets": [self.offset, self.offset + nbytes]}
        self.handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.offset += nbytes
        self.total += nbytes
        self.weight_map[name] = len(self.files) - 1

    def _close(self) -> None:
        header = json.dumps(self.entries[-1], separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise AssertionError("safetensors header outgrew its reserved space")
        self.handle.seek(0)
        self.handle.write(self.header_bytes.to_bytes(8, "little"))
        self.handle.write(header + b" " * (self.header_bytes - len(header)))
        self.handle.close()
        self.handle, self.offset = None, 0

    def finish(self) -> list[str]:
        """Close the last shard, give the files their final names and write the index."""
        if self.handle is not None:
            self._close()
        names = [f"model-{k + 1:05d}-of-{len(self.files):05d}.safetensors" for k in range(len(self.files))]
        for file, name in zip(self.files, names):
            file.rename(self.directory / name)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {tensor: names[k] for tensor, k in sorted(self.weight_map.items())}}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names

    def report(self, say: Callable[[str], None], every: float = 2.0) -> None:
        now = time.perf_counter()
        if now - self._last_report >= every:
            self._last_report = now
            say(f"  {len(self.weight_map)} tensors, {self.total / 1e9:.2f} GB, "
                f"{self.total / 1e6 / max(now - self._start, 1e-9):.0f} MB/s")


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8
