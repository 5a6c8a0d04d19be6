"""Hugging Face Molmo2 checkpoints <-> our param tree, streamed tensor by tensor without torch.

Import reads each source tensor once (safetensors memory-maps the files) and fills each param once; anything
missing, unexpected or mis-shaped fails with one message listing it. Export walks the same table backwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from molmo2_jax.checkpoint.table import NATIVE, RELEASED, UNUSED_VIT_BLOCK, Rule, active_rules, layer_count
from molmo2_jax.config import ConfigError, Molmo2Config, from_hf_config
from molmo2_jax.errors import Molmo2Error

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(Molmo2Error):
    """A checkpoint directory or file is missing, corrupt, or does not match the model config."""


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_config(src: str | Path) -> Molmo2Config:
    """Our config from `config.json` (+ `generation_config.json` for bos/eos/pad when present)."""
    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src}: not a Molmo2 checkpoint (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
        generation = src / "generation_config.json"
        if generation.is_file():
            gen = json.loads(generation.read_text())
            hf = {**{k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}, **hf}
        return from_hf_config(hf)
    except (json.JSONDecodeError, ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


class TensorSource:
    """Name -> tensor over the safetensors files of a checkpoint (index-sharded or single file)."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{src}: not a Molmo2 checkpoint (no *.safetensors files)")
        self.handles = {}
        for name in files:
            path = src / name
            try:
                self.handles[name] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, FileNotFoundError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        self.location = {}
        for file_name, handle in self.handles.items():
            for key in handle.keys():
                self.location[key] = file_name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.location))
            if missing:
                raise CheckpointError(f"{index}: lists tensors absent from the files, e.g. {missing[:3]}")
        self.src = src

    def names(self) -> set[str]:
        return set(self.location)

    def get(self, name: str) -> np.ndarray:
        file_name = self.location[name]
        try:
            return self.handles[file_name].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.src / file_name}: cannot read tensor {name} ({e})") from None


def detect_layout(names: set[str], src: Path) -> tuple[Rule, ...]:
    if "model.transformer.wte.embedding" in names:
        return RELEASED
    if "model.language_model.embed_tokens.weight" in names:
        return NATIVE
    raise CheckpointError(f"{src}: not a Molmo2 checkpoint (no Molmo2 embedding tensor among {len(names)} tensors)")


def _to_param(chunk: np.ndarray, shape: tuple[int, ...], rule: Rule) -> np.ndarray | None:
    """One HF row-block -> our layout, or None when the sizes do not fit."""
    if rule.linear:
        n_in = int(np.prod(shape[:rule.in_dims]))
        n_out = int(np.prod(shape[rule.in_dims:]))
        if chunk.shape != (n_out, n_in):
            return None
        return chunk.T.reshape(shape)
    if chunk.size != int(np.prod(shape)) or (rule.matrix and chunk.shape != shape):
        return None
    return chunk.reshape(shape)


def import_params(src: str | Path, config: Molmo2Config, shapes: dict[str, tuple[int, ...]],
                  dtype: str = "float32", place: Callable[[str, np.ndarray], object] = lambda path, x: x,
                  progress: Callable[[str], None] | None = None,
                  allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None
                  ) -> dict[str, object]:
    """Stream a Molmo2 HF checkpoint (released or native layout) into `{param_path: place(path, array)}`;
    see `import_rules`."""
    return _import_source(TensorSource(Path(src)), config, shapes, dtype=dtype, place=place, progress=progress,
                          allocate=allocate)


class ArraySource(TensorSource):
    """Named in-memory arrays, read like the tensors of a checkpoint."""

    def __init__(self, arrays: Mapping[str, np.ndarray], label: str = "<in-memory tensors>"):
        self.arrays = arrays
        self.src = Path(label)

    def names(self) -> set[str]:
        return set(self.arrays)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.arrays[name])


def import_arrays(arrays: Mapping[str, np.ndarray], config: Molmo2Config, shapes: dict[str, tuple[int, ...]],
                  dtype: str = "float32") -> dict[str, np.ndarray]:
    """`{HF name: array}` in the released or native layout (e.g. a torch model's `named_parameters`, or their
    gradients) -> `{param_path: array}` by the same table and checks as `import_params`. Every rule only moves
    entries (transpose, reshape, split, concatenate), so gradients map exactly as the weights do."""
    return _import_source(ArraySource(arrays), config, shapes, dtype=dtype)


def _import_source(source: TensorSource, config: Molmo2Config, shapes: dict[str, tuple[int, ...]],
                   **kwargs) -> dict[str, object]:
    table = active_rules(detect_layout(source.names(), source.src), config)
    return import_rules(source, table, config, shapes, unused=lambda name: _unused_vit_block(name, config),
                        **kwargs)


def import_rules(source: TensorSource, rules: Iterable[Rule], config: Molmo2Config,
                 shapes: dict[str, tuple[int, ...]], *, dtype: str = "float32",
                 place: Callable[[str, np.ndarray], object] = lambda path, x: x,
                 progress: Callable[[str], None] | None = None,
                 allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None,
                 transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {},
                 unused: Callable[[str], bool] = lambda name: False) -> dict[str, object]:
    """Fill the params named by `rules` from `source`, each source tensor read once.

    `shapes` holds the expected shape of every param (stacked layer params with their leading axis). Each
    param is complete, converted to `dtype` and handed to `place` before the next rule is read. `allocate(path,
    shape, dtype)` makes the buffer a param is filled into (default `np.empty`; a memory map keeps stacked
    params out of anonymous memory). `transforms[path]` reshapes a source block before the table's layout
    change (e.g. a conv patch embedding). Source tensors for which `unused(name)` holds may stay unread; any
    other unread, missing or mis-shaped tensor fails with one message listing them.
    """
    names = source.names()
    np_dtype = DTYPES[dtype]
    consumed: set[str] = set()
    missing, misshaped, out = [], [], {}
    for rule in rules:
        n = layer_count(rule, config)
        buffers = {p: allocate(p, shapes[p], np_dtype) if allocate else np.empty(shapes[p], np_dtype)
                   for p in rule.params}
        for i in range(n) if n is not None else [None]:
            hf_names = [h.format(i=i) for h in rule.hf]
            absent = [h for h in hf_names if h not in names]
            if absent:
                missing.extend(absent)
                continue
            consumed.update(hf_names)
            blocks = [source.get(h) for h in hf_names]
            matrix = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
            sizes = rule.param_rows(config) if rule.param_rows else (matrix.shape[0],)
            if sum(sizes) != matrix.shape[0]:
                misshaped.append(f"{'+'.join(hf_names)} {list(matrix.shape)} (expected {sum(sizes)} rows)")
                continue
            for p, chunk in zip(rule.params, np.split(matrix, np.cumsum(sizes)[:-1], axis=0)):
                shape = shapes[p][1:] if n is not None else shapes[p]
                if p in transforms:
                    chunk = transforms[p](chunk.astype(np_dtype, copy=False))
                value = _to_param(chunk, shape, rule)
                if value is None:
                    misshaped.append(f"{'+'.join(hf_names)} {list(matrix.shape)} for {p} {list(shape)}")
                    continue
                if n is None:
                    buffers[p] = value.astype(np_dtype, copy=False)
                else:
                    buffers[p][i] = value
        if not missing and not misshaped:
            for p in rule.params:
                out[p] = place(p, buffers[p])
                if progress:
                    progress(p)
        del buffers
    unexpected = sorted(h for h in names - consumed if not unused(h))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
    if misshaped:
        problems.append(f"wrong shape: {_preview(misshaped)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
    if problems:
        raise CheckpointError(f"{source.src}: checkpoint does not match the model config; " + "; ".join(problems))
    return out


def _unused_vit_block(name: str, config: Molmo2Config) -> bool:
    for pattern in UNUSED_VIT_BLOCK:
        m = re.match(pattern, name)
        if m and int(m.group(1)) >= config.vision.num_layers:
            return True
    return False


def _preview(items: list[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def export_tensors(get: Callable[[str], np.ndarray], config: Molmo2Config,
                   dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, array)` in the released layout, one tensor at a time.

    `get(param_path)` returns one param (stacked for layer params), an array or anything that reads lazily when
    indexed by layer and passed to `np.asarray` (a tensorstore handle); it is called once per rule, so a caller
    streaming from disk keeps one layer's tensors in memory.
    """
    np_dtype = DTYPES[dtype]
    for rule in active_rules(RELEASED, config):
        n = layer_count(rule, config)
        values = [get(p) for p in rule.params]
        for i in range(n) if n is not None else [None]:
            blocks = [_hf_block(np.asarray(v if i is None else v[i]), rule) for v in values]
            matrix = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
            sizes = rule.hf_rows(config) if rule.hf_rows else (matrix.shape[0],)
            parts = np.split(matrix, np.cumsum(sizes)[:-1], axis=0)
            del blocks, matrix  # keep only what is yielded alive while the next tensor is read
            for name in rule.hf:
                yield name.format(i=i), np.ascontiguousarray(parts.pop(0), dtype=np_dtype)  # one copy at most


def _hf_block(value: np.ndarray, rule: Rule) -> np.ndarray:
    """Our layout -> the HF row-block (inverse of `_to_param`)."""
    if rule.linear:
        return value.reshape(int(np.prod(value.shape[:rule.in_dims])), -1).T
    return value if rule.matrix else value.reshape(-1)
