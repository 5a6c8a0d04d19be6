"""Points, counts and tracks read from a model answer exactly as Ai2's official scorer reads them
(allenai/molmo2 `olmo/preprocessing/point_formatter.py` and `olmo/eval/`), so that our metrics give
its numbers on any answer, well-formed or not.

This is deliberately not `molmo2_jax.grounding.parse`: that parser reads an answer faithfully
(image indices, ids, labels); the scorer reads it the official way, quirks included (every group of
an image answer uses the one image size, a list of fallbacks for older formats, the first point of
an object in a frame wins, a frame given twice keeps the later one).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

import numpy as np

# html-v1/v2 answers: the coords attribute, its groups ("<time or image> <id x y ...>"), its points.
_COORDS = re.compile(r'<(?:points|tracks).*? coords="([0-9\t:;, .]+)"/?>')
_GROUP = re.compile(r"(?:^|\t|:|,|;)([0-9\.]+) ([0-9\. ]+)")
_POINT = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")

# Older image formats tried in turn when no html-v1/v2 point is found: (pattern, divisor applied
# first, scale of the values, stop here when it found points). Values above the scale are dropped.
_LEGACY_IMAGE = [
    (re.compile(r"Click\(([0-9]+\.[0-9]), ?([0-9]+\.[0-9])\)"), 1.0, 100.0, True),
    (re.compile(r"[0-9]+ ([0-9]{3}) ([0-9]{3})"), 1.0, 1000.0, True),
    (re.compile(r"[0-9]+ ([0-9]+\.[0-9]) ([0-9]+\.[0-9])"), 1.0, 100.0, True),
    (re.compile(r"\(([0-9]+\.[0-9]),? ?([0-9]+\.[0-9])\)"), 1.0, 100.0, False),
    (re.compile(r'x\d*="\s*([0-9]+(?:\.[0-9]+)?)"\s+y\d*="\s*([0-9]+(?:\.[0-9]+)?)"'), 1.0, 100.0, False),
    (re.compile(r"(?:\d+|p)\s*=\s*([0-9]{3})\s*,\s*([0-9]{3})"), 10.0, 100.0, False),
]
_LEGACY_VIDEO_BLOCK = re.compile(r"<points\s+([^/>]*?)\s*/>")
_LEGACY_TRACK_FRAME = re.compile(r"time\s+(\d+\.?\d*)\s*\n\s*(\{[^}]+\})", re.MULTILINE)

_TOTAL = re.compile(r"(?:a total of|the total number(?:\s+of\s+.+?)?\s+is:)\s*(\d+)\.?", re.IGNORECASE)


def _coord_points(text: str, width: float, height: float) -> list[tuple[float, str, float, float]]:
    """(group head, point id, x, y) of every html-v1/v2 point inside the frame."""
    out = []
    for coords in _COORDS.finditer(text):
        for group in _GROUP.finditer(coords.group(1)):
            try:
                head = float(group.group(1))
            except ValueError:  # a head like "1.2.3"; the official scorer would stop with an error here
                continue
            for m in _POINT.finditer(group.group(2)):
                x, y = float(m.group(2)) / 1000 * width, float(m.group(3)) / 1000 * height
                if 0 <= x <= width and 0 <= y <= height:
                    out.append((head, m.group(1), x, y))
    return out


def image_points(text: str, width: float, height: float) -> list[tuple[float, float]]:
    """Pixel (x, y) of every point of an image answer (`extract_points`)."""
    points = [(x, y) for _, _, x, y in _coord_points(text, width, height)]
    if points:
        return points
    for pattern, divisor, scale, final in _LEGACY_IMAGE:
        for m in pattern.finditer(text):
            vx, vy = float(m.group(1)) / divisor, float(m.group(2)) / divisor
            if max(vx, vy) <= scale:
                points.append((vx / scale * width, vy / scale * height))
        if points and final:
            return points
    return points


def video_points(text: str, width: float, height: float) -> list[tuple[float, float, float]]:
    """(time in seconds, x, y) of every point of a video answer (`extract_multi_image_points`)."""
    points = [(t, x, y) for t, _, x, y in _coord_points(text, width, height)]
    if points:
        return points
    # The older "<points 0.5 1 12.3 45.6 .../>" form, 0..100 scale; a malformed block voids them all.
    try:
        for block in _LEGACY_VIDEO_BLOCK.findall(text):
            tokens = block.split()
            if not tokens:
                continue
            t, values = float(tokens[0]), tokens[1:]
            if len(values) % 3:
                return []
            for i in range(0, len(values), 3):
                vx, vy = float(values[i + 1]), float(values[i + 2])
                if max(vx, vy) <= 100:
                    points.append((t, vx / 100.0 * width, vy / 100.0 * height))
    except ValueError:
        return []
    return points


# A predicted track frame: (frame index, {object id: (x, y)}) in the order the answer gives them.
TrackFrame = tuple[int, dict]


def track_frames(text: str, width: float, height: float, fps: float) -> list[TrackFrame]:
    """The frames of a tracking answer (`extract_tracks`): timestamps map to frame round(t * fps)."""
    by_time: dict[float, dict] = defaultdict(dict)
    for t, pid, x, y in _coord_points(text, width, height):
        by_time[t].setdefault(pid, (x, y))  # an object is listed once a frame; the first one counts
    if by_time:
        return [(round(t * fps), by_time[t]) for t in sorted(by_time)]
    return _legacy_track_frames(text, width, height, fps)


def _legacy_track_frames(text: str, width: float, height: float, fps: float) -> list[TrackFrame]:
    """The older "time 0.50\\n{0: [34.0, 63.0], ...}" form on a 0..100 scale."""
    frames = []
    for m in _LEGACY_TRACK_FRAME.finditer(text):
        try:
            t = float(m.group(1))
            objects = ast.literal_eval(m.group(2).strip())
            points = {}
            for pid, xy in objects.items():
                if len(xy) != 2 or max(xy) > 100:
                    continue
                # float32 on purpose: the official conversion divides in float32 first
                scaled = np.asarray(xy, dtype=np.float32) / 100.0 * np.array([width, height])
                points[int(pid)] = (float(scaled[0]), float(scaled[1]))
        except (ValueError, SyntaxError, TypeError, AttributeError):
            continue
        if points:
            frames.append((round(t * fps), points))
    return frames


def point_count(text: str) -> int:
    """An image counting answer's count: the number of points in it (`PointCountEval`)."""
    return len(image_points(text.lower().rstrip(".").strip(), 100, 100))


def stated_count(text: str) -> int | None:
    """A video counting answer's count (`VixMoPointCountEval`): the whole answer as an integer, else
    "a total of N"; None when neither. "none" is not read as 0: the official pattern for it is written
    without a raw string, so its word boundaries never match."""
    answer = text.strip().lower().rstrip(".").strip()
    try:
        return int(answer)
    except ValueError:
        pass
    m = _TOTAL.search(answer)
    return int(m.group(1)) if m else None
