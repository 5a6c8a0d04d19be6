"""JSONL manifests of local images / videos with conversations (schema: docs/data.md).

Lines are parsed lazily, inside the pipeline workers, so a malformed line becomes one skipped and
counted example instead of stopping the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from molmo2_jax.data.errors import BadExampleError, DataError

ROLES = ("user", "assistant")
TARGET_KEYS = ("content", "points", "tracks")


class ManifestSource:
    """Random-access lines of a JSONL manifest (a Grain data source); blank lines are ignored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest not found: {self.path}")
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read manifest {self.path}: {e}") from None
        self._lines = [(n + 1, line) for n, line in enumerate(lines) if line.strip()]
        if not self._lines:
            raise DataError(f"manifest {self.path} has no examples")

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        number, line = self._lines[index]
        return {"manifest": str(self.path), "line": number, "text": line}

    def __repr__(self) -> str:
        return f"ManifestSource({self.path})"


def _resolve(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise BadExampleError(f"{where}: media paths must be non-empty strings, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_subtitles(value: Any, where: str) -> list[dict[str, Any]]:
    """`value` as a video's subtitles, `[{"start": s, "end": e, "text": "..."}]` in seconds of the video, or
    `BadExampleError` naming `where` and the first bad entry."""
    if not isinstance(value, list):
        raise BadExampleError(f"{where}: subtitles must be a list of {{start, end, text}}, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not (isinstance(entry, dict) and _seconds(entry.get("start")) and _seconds(entry.get("end"))
                and isinstance(entry.get("text"), str)):
            raise BadExampleError(f"{where}: subtitle {i} is not {{start, end (seconds), text}}: {entry!r:.80}")
        if entry["end"] < entry["start"]:
            raise BadExampleError(f"{where}: subtitle {i} ends ({entry['end']}) before it starts ({entry['start']})")
    return [{"start": e["start"], "end": e["end"], "text": e["text"]} for e in value]


def check_clip(value: Any, where: str) -> tuple[float, float]:
    """`value` as the part of a video an example shows, `[start, end]` seconds with 0 <= start < end, or
    `BadExampleError` naming `where`. (Whether it lies inside the video is known only when it is decoded.)"""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_seconds(v) for v in value)):
        raise BadExampleError(f"{where}: clip must be [start, end] in seconds, got {value!r:.80}")
    start, end = float(value[0]), float(value[1])
    if not 0 <= start < end:
        raise BadExampleError(f"{where}: clip {start}-{end} s must start at 0 s or later and end after it starts")
    return start, end


def parse_line(record: dict[str, Any]) -> dict[str, Any]:
    """A manifest line -> the common raw example (`id`, `images`, `video`, `clip`, `messages`, `loss_multiplier`).
    A video's `subtitles` become the conversation's leading `{"role": "subtitle", "subtitles": [...]}`
    message, where the released chat template takes them (`conversation.tokenize_conversation` renders them).
    A video's `clip` (`[start, end]` seconds) is the part of it the example shows; the times of its answers
    and subtitles then count from the clip's start, as the frames' do.

    Raises `BadExampleError` naming the manifest line when it is not valid JSON or breaks the schema.
    """
    where = f"{record['manifest']}:{record['line']}"
    try:
        data = json.loads(record["text"])
    except json.JSONDecodeError as e:
        raise BadExampleError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise BadExampleError(f"{where}: each line must be a JSON object")
    name = f"{where} ({data['id']})" if isinstance(data.get("id"), str) else where
    base = Path(record["manifest"]).parent
    if "image" in data and "images" in data:
        raise BadExampleError(f"{name}: give 'image' or 'images', not both")
    images = data.get("images", [data["image"]] if "image" in data else [])
    if not isinstance(images, list):
        raise BadExampleError(f"{name}: 'images' must be a list of paths")
    video = data.get("video")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadExampleError(f"{name}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        expected = ROLES[i % 2]
        if not isinstance(m, dict) or m.get("role") != expected:
            raise BadExampleError(f"{name}: messages[{i}] must be an object with role {expected!r}")
        present = [k for k in TARGET_KEYS if k in m]
        if len(present) != 1 or (expected == "user" and present != ["content"]):
            allowed = "'content'" if expected == "user" else "one of 'content', 'points', 'tracks'"
            raise BadExampleError(f"{name}: messages[{i}] needs {allowed}")
    if messages[-1]["role"] != "assistant":
        raise BadExampleError(f"{name}: the last message must be the assistant's")
    if "subtitles" in data:
        if video is None:
            raise BadExampleError(f"{name}: 'subtitles' need a 'video'")
        messages = [{"role": "subtitle", "subtitles": check_subtitles(data["subtitles"], name)}, *messages]
    clip = data.get("clip")
    if clip is not None:
        if video is None:
            raise BadExampleError(f"{name}: a 'clip' needs a 'video'")
        clip = check_clip(clip, name)
    multiplier = data.get("loss_multiplier", 1.0)
    if not isinstance(multiplier, (int, float)) or multiplier < 0:
        raise BadExampleError(f"{name}: 'loss_multiplier' must be a non-negative number")
    return {
        "id": name,
        "images": [_resolve(base, p, f"{name}: images[{i}]") for i, p in enumerate(images)],
        "video": None if video is None else _resolve(base, video, f"{name}: video"),
        "clip": clip,
        "messages": messages,
        "loss_multiplier": float(multiplier),
    }
