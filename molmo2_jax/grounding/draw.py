"""Draw parsed groundings: points with ids and labels on an image (PNG), tracks with ids on video
frames (animated GIF with Pillow, or MP4 with PyAV). Files are written atomically."""

from __future__ import annotations

import os
import reprlib
import uuid
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .text import Grounding, GroundingError

ImageLike = Image.Image | np.ndarray

# Distinct, saturated colours; a track keeps its colour on every frame.
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)]


def _as_rgb(image: ImageLike, name: str) -> Image.Image:
    """A PIL image or uint8 [H, W] / [H, W, 3|4] array -> an RGB PIL image (a copy)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    channels_ok = arr.ndim == 2 or arr.ndim == 3 and arr.shape[2] in (3, 4)
    if arr.dtype != np.uint8 or not channels_ok:
        raise GroundingError(f"{name} must be a PIL image or a uint8 array [H, W] or [H, W, 3], "
                             f"got {arr.dtype} array of shape {list(arr.shape)}")
    return Image.fromarray(arr).convert("RGB")


def _to_pixels(grounding: Grounding, x: float, y: float, size: tuple[int, int]) -> tuple:
    """Pixel position of a point of `grounding` on an image of `size` (w, h)."""
    if not grounding.normalized:
        return x, y
    return x / 1000 * size[0], y / 1000 * size[1]


def _font(size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, min(size) // 40))


def _mark(draw: ImageDraw.ImageDraw, xy: tuple[float, float], colour, text: str, font) -> None:
    """A filled circle with a white rim and a text tag on a dark box beside it."""
    x, y = xy
    r = max(3, round(getattr(font, "size", 10) / 2))
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255), width=2)
    box = draw.textbbox((x + r + 2, y - r), text, font=font)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x + r + 2, y - r), text, fill=colour, font=font)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise GroundingError(f"output directory does not exist: {path.parent} (for {path})")
    # A fresh name (not mkstemp) so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def draw_points(
    image: ImageLike,
    groundings: Sequence[Grounding],
    out_path: str | os.PathLike | None = None,
    *,
    image_index: int = 0,
) -> Image.Image:
    """Draw the points of `groundings` that belong to image `image_index` (0-based) as circles
    tagged "id label", one colour per grounding; save to `out_path` (e.g. a .png) if given."""
    canvas = _as_rgb(image, "image")
    draw, font = ImageDraw.Draw(canvas), _font(canvas.size)
    for n, grounding in enumerate(groundings):
        for p in grounding.points:
            if p.time is None and (p.image or 0) == image_index:
                xy = _to_pixels(grounding, p.x, p.y, canvas.size)
                _mark(draw, xy, _PALETTE[n % len(_PALETTE)], f"{p.id} {grounding.label}", font)
    if out_path is not None:
        suffix = Path(out_path).suffix.lower()
        image_format = Image.registered_extensions().get(suffix)
        if image_format is None:
            raise GroundingError(f"out_path {out_path}: unknown image suffix {suffix!r} (use .png)")
        write_atomic(out_path, lambda tmp: canvas.save(tmp, format=image_format))
    return canvas


def _nearest_frames(times: Sequence[float], timestamps: np.ndarray, tolerance: float) -> list[int]:
    """Index of the frame nearest to each time, or -1 when none is within `tolerance`."""
    out = []
    for t in times:
        i = int(np.argmin(np.abs(timestamps - t)))
        out.append(i if abs(timestamps[i] - t) <= tolerance else -1)
    return out


def _render_tracks(frames: list[Image.Image], timestamps: np.ndarray,
                   groundings: Sequence[Grounding]) -> None:
    """Draw tracks (marker + id on their frames, trail so far) and video points onto `frames`."""
    size = frames[0].size
    steps = np.diff(timestamps)
    tolerance = float(np.median(steps)) / 2 if len(steps) and np.median(steps) > 0 else 0.5
    draws, font = [ImageDraw.Draw(f) for f in frames], _font(size)
    colour_no = 0
    for grounding in groundings:
        for track in grounding.tracks:
            colour = _PALETTE[colour_no % len(_PALETTE)]
            colour_no += 1
            xy = [_to_pixels(grounding, x, y, size) for _, x, y in track.points]
            at = _nearest_frames([t for t, _, _ in track.points], timestamps, tolerance)
            for f, draw in enumerate(draws):
                trail = [p for p, i in zip(xy, at) if 0 <= i <= f]
                if len(trail) > 1:
                    draw.line(trail, fill=colour, width=2)
            for p, i in zip(xy, at):
                if i >= 0:
                    _mark(draws[i], p, colour, str(track.object_id), font)
        video_points = [p for p in grounding.points if p.time is not None]
        if video_points:
            colour = _PALETTE[colour_no % len(_PALETTE)]
            colour_no += 1
            at = _nearest_frames([p.time for p in video_points], timestamps, tolerance)
            for p, i in zip(video_points, at):
                if i >= 0:
                    xy = _to_pixels(grounding, p.x, p.y, size)
                    _mark(draws[i], xy, colour, f"{p.id} {grounding.label}", font)


def _save_gif(frames: list[Image.Image], timestamps: np.ndarray, tmp: Path) -> None:
    steps_ms = np.diff(timestamps) * 1000
    last = steps_ms[-1] if len(steps_ms) else 500.0
    durations = [max(20, int(round(d))) for d in [*steps_ms, last]]
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                   duration=durations, loop=0)


def _save_mp4(frames: list[Image.Image], timestamps: np.ndarray, tmp: Path) -> None:
    import av  # only needed for MP4 output

    steps = np.diff(timestamps)
    step = float(np.median(steps)) if len(steps) and np.median(steps) > 0 else 0.5
    rate = Fraction(1 / step).limit_denominator(1000)
    w, h = frames[0].size
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w + w % 2, h + h % 2  # yuv420p needs even sides
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            arr = np.pad(np.asarray(frame), ((0, h % 2), (0, w % 2), (0, 0)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode())


def draw_tracks(
    frames: Sequence[ImageLike] | np.ndarray,
    timestamps: Sequence[float],
    groundings: Sequence[Grounding],
    out_path: str | os.PathLike,
) -> Path:
    """Draw tracks (each a stable colour, tagged with its object id, with a trail) and video
    points on `frames` shown at `timestamps` (seconds), and write an animated .gif or an .mp4.

    A point is drawn on the frame nearest to its time, if within half a frame step.
    """
    suffix = Path(out_path).suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise GroundingError(f"out_path {out_path}: suffix must be .gif or .mp4, got {suffix!r}")
    images = [_as_rgb(f, f"frames[{i}]") for i, f in enumerate(frames)]
    if not images:
        raise GroundingError("frames is empty: nothing to draw")
    if any(im.size != images[0].size for im in images):
        sizes = sorted({im.size for im in images})
        raise GroundingError(f"frames must all have one size, got (w, h) sizes {sizes}")
    try:
        times = np.asarray(timestamps, dtype=np.float64)
    except (TypeError, ValueError):
        times = np.array([np.nan])
    if times.shape != (len(images),) or not (
            np.all(np.isfinite(times)) and np.all(np.diff(times) >= 0)):
        raise GroundingError(f"timestamps must be {len(images)} finite, non-decreasing seconds "
                             f"(one per frame), got {reprlib.repr(timestamps)}")
    _render_tracks(images, times, groundings)
    save = _save_gif if suffix == ".gif" else _save_mp4
    return write_atomic(out_path, lambda tmp: save(images, times, tmp))
