"""Rows of the released datasets' files on local disk (the hub's parquet, JSON or JSONL), shared by the training
converters (`data/released.py`) and the evaluation readers (`evaluation/datasets.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from molmo2_jax.data.errors import DataError


class DatasetError(DataError):
    """A data file that cannot be read as the task's schema; the message names the file."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .parquet file, a .json list (or {"data": [...]}), a .jsonl file, or a directory of
    such files (read in name order, as the hub's `data/*-0000N-of-0000M.parquet`)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".json", ".jsonl"))
        if not files:
            raise DatasetError(f"{path}: no .parquet, .json or .jsonl files in this directory")
        return [row for f in files for row in read_rows(f)]
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not readable as {path.suffix.lstrip('.') or 'data'} ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"{path}: expected a list of row objects")
    return data
