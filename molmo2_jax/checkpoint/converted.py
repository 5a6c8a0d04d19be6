"""Our converted checkpoint format: `molmo2_jax_config.json` (our config) + an Orbax `params/` tree, plus the
tokenizer and processor files carried over from the source. Written to a temporary sibling and renamed, so a
failed conversion leaves nothing at the destination."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from molmo2_jax.config import Molmo2Config, from_dict, to_dict
from molmo2_jax.params import unflatten

CONFIG_FILE = "molmo2_jax_config.json"
PARAMS_DIR = "params"
# Files a checkpoint directory may carry besides the weights (tokenizer, processor, chat template).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
              "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "generation_config.json")


def is_converted(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def read_config(path: Path) -> Molmo2Config:
    return from_dict(Molmo2Config, json.loads((path / CONFIG_FILE).read_text())).validate()


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def prepare_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a non-empty destination unless `overwrite`."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")


def write_atomically(dst: Path, overwrite: bool, fill: Callable[[Path], Any]) -> Any:
    """Run `fill(tmp_dir)` then move the result to `dst`; on any error remove the temporary directory."""
    prepare_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary directory
    try:
        result = fill(tmp)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
        return result
    except BaseException:
        _remove_settled(tmp)
        raise


def _remove_settled(directory: Path, quiet_seconds: float = 0.5, max_seconds: float = 30.0) -> None:
    """Remove `directory` and keep removing it until it has stayed gone for `quiet_seconds`: after a failed
    Orbax save, TensorStore writes still in flight can add files (and their directories) while it goes."""
    deadline = time.monotonic() + max_seconds
    gone_since = None
    while time.monotonic() < deadline:
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet_seconds:
            return
        time.sleep(0.05)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(dst: Path, config: Molmo2Config, params: dict[str, Any]) -> None:
    """Write config + params (a tree of jax arrays) into an (empty) directory."""
    write_config(dst, config)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((dst / PARAMS_DIR).absolute(), params)


def write_config(dst: Path, config: Molmo2Config) -> None:
    (dst / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))


# Host-array saves stream from the arrays' own memory (no defensive copy) in small chunks and small OCDBT data
# files, so memory-mapped params are written with a constant amount of anonymous memory.
_HOST_CHUNK_BYTES = 16 << 20


def save_host_params(dst: Path, flat: dict[str, np.ndarray], stacked: Collection[str] = ()) -> None:
    """Write `{param_path: numpy array}` (typically `np.memmap`s) as the Orbax `params/` item of `dst`.

    The result restores exactly like `save`'s. Peak anonymous memory stays near a few chunks whatever the
    array sizes; memory-mapped pages are file-backed, so the kernel can write them back and drop them. Params in
    `stacked` (leading layer axis) get one-layer chunks, so a reader can fetch one layer without decoding others.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, type_handler_registry=registry)
    save_args = {p: ocp.SaveArgs(chunk_byte_size=_HOST_CHUNK_BYTES, shard_axes=(0,) if p in stacked else ())
                 for p in flat}
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save((dst / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(
            unflatten(flat), save_args=unflatten(save_args), ocdbt_target_data_file_size=_HOST_CHUNK_BYTES))


def restore_params(path: Path, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restore params into the shapes, dtypes and shardings of `abstract` (a tree of ShapeDtypeStruct)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((path / PARAMS_DIR).absolute(), abstract)
