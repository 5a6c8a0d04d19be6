"""Predictions files: one JSON object per line, {"id": ..., "prediction": "<raw model text>"}, from
our `eval` or any other system (transformers, vLLM). Ids are compared as strings."""

from __future__ import annotations

import json
from pathlib import Path

from molmo2_jax.errors import Molmo2Error


class PredictionsError(Molmo2Error):
    """A predictions file that cannot be read; the message names the file and the bad lines."""


def read_predictions(path: str | Path) -> dict[str, str]:
    """id -> prediction text. Every malformed line is reported at once, by line number."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: file not found")
    out: dict[str, str] = {}
    bad: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(f"{number} (not JSON)")
            continue
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("prediction"), str):
            bad.append(f"{number} (needs an \"id\" and a string \"prediction\")")
        elif str(record["id"]) in out:
            bad.append(f"{number} (id {record['id']} given twice)")
        else:
            out[str(record["id"])] = record["prediction"]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise PredictionsError(f"{path}: malformed lines {shown}")
    return out
