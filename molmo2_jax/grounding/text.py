"""Molmo2 grounded answers as text: parse points, counts and tracks, and format them back.

Molmo2 (html-v2 format) writes coordinates as integers on a 0..1000 scale of the image or frame:

    <points alt="..." coords="1 1 123 456 2 789 012">label</points>      one image
    <points coords="1 1 100 200 2 500 500;3 3 900 900">label</points>    images 1 and 3
    <points coords="0.5 1 123 456;2.0 2 234 567">label</points>          video, seconds
    <tracks coords="0.0 1 123 456 2 345 678;0.5 1 130 460">label</tracks>

wrapped in "Counting the <points ...>label</points> shows a total of N." or
"There are N <points ...>label</points>.", with "There are none." for zero objects and
"No tracks available." for a tracking answer without tracks. A video frame without points keeps
its group ("0.0 1 016 042;0.5 "). The formatters follow the html-v2 `UnifiedPointFormatter` of
allenai/molmo2 (olmo/preprocessing/point_formatter.py) and the parser its extraction regexes. The
Molmo v1 forms `<point x="10.5" y="20.1" alt="...">label</point>` and `<points x1=".." ...>` use a
0..100 scale and are still read.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from molmo2_jax.errors import Molmo2Error

Size = tuple[float, float]  # (width, height) in pixels

NONE_ANSWER = "There are none."
NO_TRACKS_ANSWER = "No tracks available."


class GroundingError(Molmo2Error):
    """Invalid input to a grounding formatter or drawing function; the message names the input."""


@dataclass(frozen=True)
class Point:
    """One pointed location. `image` is 0-based (the text writes it 1-based); `time` in seconds."""

    x: float
    y: float
    id: int = 0
    image: int | None = None
    time: float | None = None


@dataclass
class Track:
    """One tracked object: (time in seconds, x, y) for each frame where it is visible."""

    object_id: int
    points: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class Grounding:
    """One `<points>`/`<tracks>` element of an answer.

    Coordinates are pixels of the original image/frame when the parser was given sizes; otherwise
    (`normalized=True`) they are on Molmo2's 0..1000 scale. `count` is the number stated by the
    counting sentence around the element, if any.
    """

    label: str
    points: list[Point] = field(default_factory=list)
    tracks: list[Track] = field(default_factory=list)
    count: int | None = None
    alt: str | None = None
    normalized: bool = False

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tracks' points as [time, x, y] lists)."""
        out = asdict(self)
        for track in out["tracks"]:
            track["points"] = [list(p) for p in track["points"]]
        return out


# ---------------------------------------------------------------------------------------------
# Parsing. Follows the official eval regexes; never raises on malformed text.

# A quoted value may be cut off by the end of the text (generation stopped at max tokens).
_ATTR = r'[\w-]+\s*=\s*(?:"[^"]*(?:"|$)|[^\s"<>/]+)'
_ELEMENT = re.compile(
    rf"<(?P<tag>points|tracks|point)(?P<attrs>(?:\s+{_ATTR})*)\s*(?:/?>|$)"
    # The label runs to the matching close tag but never across another element.
    r"(?:(?P<label>(?:(?!</?(?:points|tracks|point)\b).)*?)</(?P=tag)\s*>)?",
    re.DOTALL,
)
_ATTRS = re.compile(r'([\w-]+)\s*=\s*(?:"([^"]*)(?:"|$)|([^\s"<>/]+))')
# One group: image index or seconds, then its "id x y" triplets (the official frame regex; a
# group with no triplets, "0.5 ", matches nothing).
_GROUP = re.compile(r"(?:^|[\t:;,])([0-9.]+) ([0-9. ]+)")
_TRIPLET = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")
_LEGACY_XY = re.compile(r"x(\d*)")
_COUNT_BEFORE = re.compile(r"(?:counting the|there (?:are|is) (\d+))\s*$", re.IGNORECASE)
_COUNT_AFTER = re.compile(r"\s*shows a total of (\d+)", re.IGNORECASE)
_TOTAL = re.compile(r"a total of (\d+)", re.IGNORECASE)
_THERE_ARE = re.compile(r"there (?:are|is) (\d+)", re.IGNORECASE)
_INTEGER_ANSWER = re.compile(r"\s*(\d+)\.?\s*")
_NONE = re.compile(r"\bnone\b|\bno tracks\b", re.IGNORECASE)


def _scale(vx: float, vy: float, full: float, size: Size | None) -> tuple[float, float] | None:
    """Value on a 0..`full` scale -> pixels (or 0..1000 units); None when outside the image."""
    if size is None:
        x, y, w, h = vx * 1000 / full, vy * 1000 / full, 1000.0, 1000.0
    else:
        w, h = size
        x, y = vx / full * w, vy / full * h
    return (x, y) if 0 <= x <= w and 0 <= y <= h else None


def _group_key(head: str, by_time: bool, n_images: int | None) -> float | int | None:
    """A group's leading number -> time in seconds or 0-based image index; None if invalid.

    With one image every group is on it, as in the official single-image eval (which scales all
    groups by the one image size whatever their index)."""
    try:
        value = float(head)
    except ValueError:  # "1.2.3"
        return None
    if by_time:
        return value
    if n_images == 1:
        return 0
    if value != int(value) or value < 1 or (n_images is not None and value > n_images):
        return None
    return int(value) - 1


def _parse_coords(coords: str, is_track: bool, image_sizes, video_size) -> tuple[list, list]:
    points: list[Point] = []
    tracks: dict[int, Track] = {}
    seen: set[tuple[int, float]] = set()
    for head, rest in _GROUP.findall(coords):
        by_time = is_track or video_size is not None or (image_sizes is None and "." in head)
        key = _group_key(head, by_time, None if image_sizes is None else len(image_sizes))
        if key is None:
            continue
        size = video_size if by_time else (None if image_sizes is None else image_sizes[key])
        for m in _TRIPLET.finditer(rest):
            xy = _scale(float(m.group(2)), float(m.group(3)), 1000, size)
            if xy is None:
                continue
            pid = int(m.group(1))
            if is_track:
                if (pid, key) in seen:  # an object appears once per frame; keep the first
                    continue
                seen.add((pid, key))
                tracks.setdefault(pid, Track(pid)).points.append((key, *xy))
            elif by_time:
                points.append(Point(*xy, id=pid, time=key))
            else:
                points.append(Point(*xy, id=pid, image=key))
    for track in tracks.values():
        track.points.sort(key=lambda p: p[0])
    return points, sorted(tracks.values(), key=lambda t: t.object_id)


def _parse_legacy(attrs: dict[str, str], size: Size | None) -> list[Point]:
    """Molmo v1 `x=".." y=".."` or `x1=".." y1=".." x2=..` attributes on a 0..100 scale."""
    points = []
    for name in attrs:
        m = _LEGACY_XY.fullmatch(name)
        if m is None or f"y{m.group(1)}" not in attrs:
            continue
        try:
            vx, vy = float(attrs[name]), float(attrs[f"y{m.group(1)}"])
        except ValueError:
            continue
        xy = _scale(vx, vy, 100, size)
        if xy is not None:
            points.append(Point(*xy, id=int(m.group(1) or 1), image=0))
    return points


def _stated_count(text: str, start: int, end: int) -> int | None:
    """The count of a counting sentence around the element at text[start:end], if any."""
    # Only the few characters next to the element matter; keeps long answers linear.
    before = _COUNT_BEFORE.search(text, max(0, start - 64), start)
    if before is None:
        return None
    if before.group(1) is not None:
        return int(before.group(1))
    after = _COUNT_AFTER.match(text, end)
    return int(after.group(1)) if after else None


def parse(
    text: str, *, image_sizes: Sequence[Size] | None = None, video_size: Size | None = None
) -> list[Grounding]:
    """Parse every `<points>`, `<tracks>` and legacy `<point>` element of a model answer.

    Give `image_sizes` (one (w, h) per image, in prompt order) for image answers or `video_size`
    for video answers to get pixel coordinates; without sizes coordinates stay on the 0..1000
    scale and groups are read as timestamps when they contain a '.'. As in the official eval,
    points outside the image are dropped and with a single image size every group is read on that
    image; with several, a group whose number names no image is dropped. Malformed text yields
    whatever could be read.
    """
    if image_sizes is not None and video_size is not None:
        raise GroundingError("parse: give image_sizes or video_size, not both")
    if image_sizes is not None and len(image_sizes) == 0:
        raise GroundingError("parse: image_sizes is empty; give one (width, height) per image")
    groundings = []
    for m in _ELEMENT.finditer(text):
        attrs = {a.group(1): a.group(2) if a.group(2) is not None else a.group(3)
                 for a in _ATTRS.finditer(m.group("attrs"))}
        if "coords" in attrs:
            points, tracks = _parse_coords(
                attrs["coords"], m.group("tag") == "tracks", image_sizes, video_size)
        elif any(_LEGACY_XY.fullmatch(name) for name in attrs):
            size = video_size if image_sizes is None else image_sizes[0]
            points, tracks = _parse_legacy(attrs, size), []
        else:
            continue
        groundings.append(Grounding(
            label=m.group("label") or "", points=points, tracks=tracks,
            count=_stated_count(text, m.start(), m.end()), alt=attrs.get("alt"),
            normalized=image_sizes is None and video_size is None))
    return groundings


def parse_count(text: str) -> int | None:
    """The object count an answer states ("a total of N", "There are N", a bare "N", "none" or
    "No tracks available." -> 0).

    Falls back to the number of points (or tracked objects) when no count is stated; None when
    the answer holds neither.
    """
    bare = _INTEGER_ANSWER.fullmatch(text)
    if bare:
        return int(bare.group(1))
    for pattern in (_TOTAL, _THERE_ARE):
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    if _NONE.search(text):
        return 0
    groundings = parse(text)
    if not groundings:
        return None
    return sum(len(g.points) + len(g.tracks) for g in groundings)


# ---------------------------------------------------------------------------------------------
# Formatting (the training-data side), as the official html-v2 formatter writes it. Raises
# GroundingError on invalid input.


def _to_units(x: float, y: float, size: Size | None, what: str) -> tuple[int, int]:
    """Pixels (or 0..1000 values when size is None) -> integers on the 0..1000 scale.

    As the official formatter: divide by the size first, then scale by 1000 and round half to even
    (Python's round); `round(1000 * x / w)` differs at some .5 boundaries (x = 0.45 px of 100 gives
    5, not 4). A point outside the image is an error here; the official formatter clamps it.
    """
    w, h = (1000.0, 1000.0) if size is None else size
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise GroundingError(f"{what}: coordinates must be numbers, got ({x!r}, {y!r})") from None
    if not (w > 0 and h > 0):
        raise GroundingError(f"{what}: image size must be positive, got {size}")
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
        unit = "0..1000 units" if size is None else f"pixels of a {w:g}x{h:g} image"
        raise GroundingError(f"{what}: ({x:g}, {y:g}) is outside [0, {w:g}] x [0, {h:g}] ({unit})")
    return round(1000 * (x / w)), round(1000 * (y / h))


def _format_time(t: float | None, what: str) -> str:
    if not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise GroundingError(f"{what}: time must be a non-negative number of seconds, got {t!r}")
    return f"{float(t):.1f}"


def _triplets(items: Iterable[tuple[int, int, int]]) -> str:
    return " ".join(f"{i} {x:03d} {y:03d}" for i, x, y in items)


def _element(tag: str, label: str, alt: str | None, coords: str) -> str:
    if re.search(r"</?(?:points|tracks|point)\b", label):
        raise GroundingError(f"label {label!r} contains a <points>/<tracks> tag")
    if alt is not None and '"' in alt:
        raise GroundingError(f"alt {alt!r} contains a double quote")
    alt_attr = "" if alt is None else f' alt="{alt}"'
    return f'<{tag}{alt_attr} coords="{coords}">{label}</{tag}>'


def _point_groups(points: Sequence[Point], image_sizes: Sequence[Size] | None,
                  video_size: Size | None, frame_times: Sequence[float] | None,
                  what: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """The groups `points` are written in: (image number or timestamp, the group's points on the
    0..1000 scale sorted by (x, y)), in written order."""
    try:
        frame_times = None if frame_times is None else list(frame_times)
    except TypeError:
        raise GroundingError(
            f"{what}: frame_times must be a list of seconds, got {frame_times!r}") from None
    is_video = frame_times is not None or (
        points[0].time is not None if len(points) else video_size is not None)
    if (image_sizes if is_video else video_size) is not None:
        raise GroundingError(f"{what}: video points take video_size, image points take image_sizes")
    groups: dict[float, list[tuple[int, int]]] = {}
    for n, t in enumerate(frame_times or ()):
        _format_time(t, f"{what}: frame_times[{n}]")
        if t in groups:
            raise GroundingError(f"{what}: frame_times repeats {t}")
        groups[t] = []
    for n, p in enumerate(points):
        where = f"{what}: points[{n}]"
        if (p.time is not None) != is_video or (is_video and p.image is not None):
            raise GroundingError(f"{where} mixes image and video points ({p})")
        if is_video:
            _format_time(p.time, where)
            if frame_times is not None and p.time not in groups:
                raise GroundingError(f"{where}: time {p.time} is not one of frame_times")
            key, size = p.time, video_size
        else:
            key = 0 if p.image is None else p.image
            if not isinstance(key, numbers.Integral) or key < 0 or (
                    image_sizes is not None and key >= len(image_sizes)):
                n_sizes = "no" if image_sizes is None else len(image_sizes)
                raise GroundingError(
                    f"{where}: image index {key} is invalid ({n_sizes} image_sizes)")
            size = None if image_sizes is None else image_sizes[key]
        groups.setdefault(key, []).append(_to_units(p.x, p.y, size, where))
    # Given frames keep their order, and their group when empty (as the official video formatter);
    # otherwise groups go by time or image number, and an image without points has no group (as
    # the official multi-image training data).
    keys = list(groups) if frame_times is not None else sorted(groups)
    return [(_format_time(k, what) if is_video else str(k + 1), sorted(groups[k])) for k in keys]


def format_points(
    label: str,
    points: Sequence[Point],
    *,
    image_sizes: Sequence[Size] | None = None,
    video_size: Size | None = None,
    frame_times: Sequence[float] | None = None,
    alt: str | None = None,
) -> str:
    """Format points as one `<points>` element (or "There are none." when empty).

    Points with `time` set are video points (`video_size` scales them); otherwise `image` (0-based,
    None = 0) selects the image and `image_sizes[image]` scales it. Without sizes x, y are already
    on the 0..1000 scale. `frame_times` (video) lists every frame the answer covers, in order: each
    is written as a group, also when it has no point, and every point's time must be one of them;
    without it each distinct point time is a group, in time order. Ids are assigned here as in the
    training data: points sorted by their 0..1000 (x, y) within each group, numbered from 1 across
    groups; the input ids are ignored.
    """
    groups = _point_groups(points, image_sizes, video_size, frame_times, "format_points")
    if not points:
        return NONE_ANSWER
    parts, next_id = [], 1
    for head, xy in groups:
        parts.append(f"{head} " + _triplets((next_id + i, x, y) for i, (x, y) in enumerate(xy)))
        next_id += len(xy)
    return _element("points", label, alt, ";".join(parts))


def format_count(
    label: str,
    points: Sequence[Point],
    *,
    mode: Literal["point_then_count", "count_then_point", "count"] = "point_then_count",
    image_sizes: Sequence[Size] | None = None,
    video_size: Size | None = None,
    frame_times: Sequence[float] | None = None,
    alt: str | None = None,
) -> str:
    """A counting answer: "Counting the <points>…</points> shows a total of N."
    (point_then_count), "There are N <points>…</points>." (count_then_point) or "N" (count);
    "There are none." for no points."""
    if mode not in ("point_then_count", "count_then_point", "count"):
        raise GroundingError(f"format_count: mode must be point_then_count, count_then_point or "
                             f"count, got {mode!r}")
    element = format_points(label, points, image_sizes=image_sizes, video_size=video_size,
                            frame_times=frame_times, alt=alt)
    if not points:
        return element
    if mode == "point_then_count":
        return f"Counting the {element} shows a total of {len(points)}."
    if mode == "count_then_point":
        return f"There are {len(points)} {element}."
    return str(len(points))


def format_tracks(
    label: str, tracks: Sequence[Track], *, video_size: Size | None = None, alt: str | None = None
) -> str:
    """Format tracks as one `<tracks>` element, or "No tracks available." when no point is visible.

    As the official formatter: one group per frame time, in time order; within a frame points are
    sorted by their 0..1000 (x, y) (ties keep the order of `tracks`), objects are renumbered 1.. by
    first appearance in that order, and the frame lists them by the new id. An occluded point is
    simply absent from its track; a frame with no visible point has no group.
    """
    frames: dict[float, list[tuple[int, int, int]]] = {}
    written: set[tuple[str, int]] = set()
    seen_objects: set[int] = set()
    for n, track in enumerate(tracks):
        if track.object_id in seen_objects:
            raise GroundingError(f"format_tracks: tracks[{n}] repeats object_id {track.object_id}")
        seen_objects.add(track.object_id)
        for k, point in enumerate(track.points):
            what = f"format_tracks: tracks[{n}].points[{k}]"
            if len(point) != 3:
                raise GroundingError(f"{what} must be (time, x, y), got {point!r}")
            t, x, y = point
            head = _format_time(t, what)
            if (head, track.object_id) in written:  # the parser would keep only one of them
                raise GroundingError(f"{what}: object {track.object_id} already has a point at "
                                     f"time {head}")
            written.add((head, track.object_id))
            frames.setdefault(t, []).append((*_to_units(x, y, video_size, what), track.object_id))
    if not frames:
        return NO_TRACKS_ANSWER
    new_id: dict[int, int] = {}
    parts = []
    for t in sorted(frames):
        frame = sorted(frames[t], key=lambda p: p[:2])  # stable: ties keep the order of `tracks`
        for _, _, obj in frame:
            new_id.setdefault(obj, len(new_id) + 1)
        ids_xy = sorted((new_id[obj], x, y) for x, y, obj in frame)
        parts.append(f"{_format_time(t, 'format_tracks')} {_triplets(ids_xy)}")
    return _element("tracks", label, alt, ";".join(parts))
