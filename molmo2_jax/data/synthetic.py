"""Synthetic grounding data: plain-background images and short videos of simple coloured shapes with
pointing, counting (0 included), caption, QA and tracking answers in Molmo2's formats.

Every example is a pure function of (config, split, index): a scene spec is drawn from a seeded RNG,
its conversation is written with the grounding formatters, and its media are rendered (PNG / MPEG-4
bytes) only when needed, so the tokenizer can be trained on the text without drawing anything.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from molmo2_jax.data.errors import DataError
from molmo2_jax.grounding import Point, Track, format_count, format_points, format_tracks
from molmo2_jax.preprocessing.video import sample_times

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 170), "orange": (240, 130, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle", "diamond")
IMAGE_TASKS = ("point", "count", "caption", "qa")
VIDEO_TASKS = ("track", "video_count")
# Bumped when a record's contents change, so that `build-synthetic --reuse` rebuilds an older set (2: masks).
RECORD_VERSION = 2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters. Defaults give 378x378 images (1x1 tiling: 2 crops) and 5-frame videos."""

    num_train: int = 2000
    num_eval: int = 200
    seed: int = 0
    image_size: int = 378  # square images and video frames, pixels
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    backgrounds: tuple[str, ...] = ("white", "gray")
    max_count: int = 5  # objects of the asked-about kind: 0..max_count
    max_distractors: int = 3  # objects of other kinds
    object_size: tuple[int, int] = (30, 54)  # side of an object's bounding box, pixels
    video_frames: int = 5
    video_fps: float = 2.0
    max_tracked: int = 2  # moving objects of the tracked kind: 1..max_tracked
    # Share of each task among examples (normalised); video tasks give videos, the others images.
    task_weights: tuple[tuple[str, float], ...] = (
        ("point", 0.3), ("count", 0.3), ("caption", 0.05), ("qa", 0.05), ("track", 0.2), ("video_count", 0.1))
    count_style: str = "point_then_count"  # or "count_then_point"

    def __post_init__(self):
        unknown = [t for t, _ in self.task_weights if t not in IMAGE_TASKS + VIDEO_TASKS]
        bad = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        bad += [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown or bad:
            raise DataError(f"SyntheticConfig: unknown tasks {unknown} / names {bad}; tasks are "
                            f"{IMAGE_TASKS + VIDEO_TASKS}, colors {sorted(COLORS)}, shapes {SHAPES}, "
                            f"backgrounds {sorted(BACKGROUNDS)}")
        if self.max_count > 9 or self.object_size[1] * 3 > self.image_size:
            raise DataError(f"SyntheticConfig: max_count must be <= 9 and object_size at most a third of image_size; "
                            f"got max_count={self.max_count}, object_size={self.object_size}, "
                            f"image_size={self.image_size}")
        small = {k: getattr(self, k) for k in ("num_train", "num_eval", "max_tracked", "video_frames", "video_fps")
                 if not getattr(self, k) >= (2 if k == "video_frames" else 1)}
        lo, hi = self.object_size
        if small or self.max_count < 0 or self.max_distractors < 0 or not 0 < lo <= hi:
            raise DataError(f"SyntheticConfig: {small or 'counts and object_size'} out of range (num_train, "
                            f"num_eval, max_tracked >= 1; video_frames >= 2; 0 < object_size[0] <= object_size[1])")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SyntheticConfig:
        data = json.loads(text)
        data["task_weights"] = tuple(tuple(x) for x in data["task_weights"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclasses.dataclass
class Obj:
    shape: str
    color: str
    size: int
    track: list[tuple[float, float]]  # centre per frame (one entry for images)


def _rng(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, zlib.crc32(split.encode()), index])


def _plural(color: str, shape: str, n: int = 2) -> str:
    return f"{color} {shape}" + ("" if n == 1 else "s")


def _place(rng, config: SyntheticConfig, kinds: list[tuple[str, str]]) -> list[Obj]:
    """Non-overlapping objects at random positions (rejection sampling)."""
    lo, hi = config.object_size
    objs: list[Obj] = []
    for shape, color in kinds:
        for _ in range(200):
            size = int(rng.integers(lo, hi + 1))
            cx, cy = rng.uniform(size / 2 + 2, config.image_size - size / 2 - 2, size=2)
            if all(math.hypot(cx - o.track[0][0], cy - o.track[0][1]) > (size + o.size) / 2 + 4 for o in objs):
                objs.append(Obj(shape, color, size, [(float(cx), float(cy))]))
                break
    return objs


def _kinds(rng, config: SyntheticConfig, target: tuple[str, str], n_target: int) -> list[tuple[str, str]]:
    others = [(s, c) for s in config.shapes for c in config.colors if (s, c) != target]
    n_other = int(rng.integers(0, config.max_distractors + 1))
    picks = [others[i] for i in rng.integers(0, len(others), n_other)]
    return [target] * n_target + picks


def _move(rng, config: SyntheticConfig, objs: list[Obj]) -> None:
    """Give each object a straight path that bounces off the borders, one position per frame."""
    for o in objs:
        speed = rng.uniform(0.06, 0.12) * config.image_size
        angle = rng.uniform(0, 2 * math.pi)
        vx, vy = speed * math.cos(angle), speed * math.sin(angle)
        x, y = o.track[0]
        half = o.size / 2 + 1
        for _ in range(config.video_frames - 1):
            x, y = x + vx, y + vy
            if not half <= x <= config.image_size - half:
                vx, x = -vx, min(max(x, half), config.image_size - half)
            if not half <= y <= config.image_size - half:
                vy, y = -vy, min(max(y, half), config.image_size - half)
            o.track.append((float(x), float(y)))


def _caption(background: str, objs: list[Obj]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    if not counts:
        return f"An empty {background} image."
    parts = [f"{NUMBER_WORDS[n]} {_plural(c, s, n)}" for (c, s), n in sorted(counts.items())]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"A {background} image with {listing}."


def sample_frame_times(config: SyntheticConfig, num_frames: int = 384, max_fps: float = 2.0) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Times the released sampling rule shows for a synthetic video, and the frame on screen at each."""
    duration = config.video_frames / config.video_fps
    times = sample_times(duration, num_frames, max_fps)
    frames = np.minimum(np.floor(times * config.video_fps + 1e-6).astype(int), config.video_frames - 1)
    return times, frames


def make_spec(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """The scene and conversation of example `index` of `split` (no rendering)."""
    rng = _rng(config, split, index)
    tasks, weights = zip(*config.task_weights)
    task = tasks[int(rng.choice(len(tasks), p=np.asarray(weights) / sum(weights)))]
    background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    target = (config.shapes[int(rng.integers(len(config.shapes)))],
              config.colors[int(rng.integers(len(config.colors)))])
    shape, color = target
    label = _plural(color, shape)
    size = (config.image_size, config.image_size)
    video = task in VIDEO_TASKS
    if task == "track":
        n_target = int(rng.integers(1, config.max_tracked + 1))
    elif task == "qa":
        n_target = int(rng.integers(0, 2))
    else:
        n_target = int(rng.integers(0, config.max_count + 1))
    objs = _place(rng, config, _kinds(rng, config, target, n_target))
    if video:
        _move(rng, config, objs)
    hits = [o for o in objs if (o.shape, o.color) == target]

    if task == "point":
        question = f"Point to the {label}."
        answer = format_points(label, [Point(*o.track[0]) for o in hits], image_sizes=[size])
    elif task == "count":
        question = f"How many {label} are there?"
        answer = format_count(label, [Point(*o.track[0]) for o in hits], mode=config.count_style, image_sizes=[size])
    elif task == "caption":
        question = "Describe this image."
        answer = _caption(background, objs)
    elif task == "qa":
        question = f"Is there a {color} {shape}?"
        answer = "Yes." if hits else "No."
    elif task == "track":
        question = f"Track the {label}."
        times, frames = sample_frame_times(config)
        tracks = [Track(i + 1, [(float(t), *o.track[f]) for t, f in zip(times, frames)]) for i, o in enumerate(hits)]
        answer = format_tracks(label, tracks, video_size=size)
    else:  # video_count: each object pointed at in the first frame
        question = f"How many {label} are in the video?"
        answer = format_count(label, [Point(*o.track[0], time=0.0) for o in hits], mode=config.count_style,
                              video_size=size)
    return {
        "id": f"{split}-{index:06d}", "task": task, "background": background, "video": video,
        "objects": [dataclasses.asdict(o) for o in objs], "label": label, "count": len(hits),
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


def _objects(spec: dict[str, Any]) -> list[Obj]:
    return [Obj(o["shape"], o["color"], o["size"], [tuple(p) for p in o["track"]]) for o in spec["objects"]]


def _draw(draw: ImageDraw.ImageDraw, o: Obj, frame: int, fill) -> None:
    x, y = o.track[frame]
    r = o.size / 2
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "triangle":  # centroid at (x, y)
        draw.polygon([(x, y - 4 * r / 3), (x - r, y + 2 * r / 3), (x + r, y + 2 * r / 3)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def render_frames(config: SyntheticConfig, spec: dict[str, Any]) -> np.ndarray:
    """`[F, H, W, 3]` uint8 frames of a spec (F = 1 for images)."""
    objs = _objects(spec)
    n = config.video_frames if spec["video"] else 1
    out = np.empty((n, config.image_size, config.image_size, 3), np.uint8)
    for f in range(n):
        img = Image.new("RGB", (config.image_size, config.image_size), BACKGROUNDS[spec["background"]])
        draw = ImageDraw.Draw(img)
        for o in objs:
            _draw(draw, o, f, COLORS[o.color])
        out[f] = np.asarray(img)
    return out


def rle(mask: np.ndarray) -> dict[str, Any]:
    """A [H, W] mask as an uncompressed COCO RLE, as pycocotools reads it: alternating run lengths of 0s and
    1s (starting with 0s) over the pixels in column-major order."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def object_masks(config: SyntheticConfig, spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Each object's mask in each frame (`rle`), the whole shape even where another object covers part of it
    (moving objects may overlap)."""
    n = config.video_frames if spec["video"] else 1
    out = []
    for o in _objects(spec):
        per_frame = []
        for f in range(n):
            img = Image.new("L", (config.image_size, config.image_size), 0)
            _draw(ImageDraw.Draw(img), o, f, 1)
            per_frame.append(rle(np.asarray(img)))
        out.append(per_frame)
    return out


def encode_png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def encode_video(frames: np.ndarray, fps: float) -> bytes:
    """MPEG-4 bytes (mp4 container) of `[F, H, W, 3]` uint8 frames at `fps`."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def make_example(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """A dataset record: id, task, encoded media, messages (JSON) and the ground truth (JSON): the objects
    (shape, colour, size, centre per frame), their masks per frame (`object_masks`), the asked-about label and
    count, the image size (w, h), the video frame rate and, for videos, `sample_frame_times`."""
    spec = make_spec(config, split, index)
    frames = render_frames(config, spec)
    truth = {k: spec[k] for k in ("objects", "label", "count", "background")}
    truth.update(size=[config.image_size, config.image_size], fps=config.video_fps,
                 masks=object_masks(config, spec))
    if spec["video"]:  # the times a video's answer names, and the frame on screen at each
        times, shown = sample_frame_times(config)
        truth.update(frame_times=times.tolist(), frames=shown.tolist())
    return {
        "id": spec["id"], "task": spec["task"],
        "images": [] if spec["video"] else [encode_png(frames[0])],
        "video": encode_video(frames, config.video_fps) if spec["video"] else b"",
        "messages": json.dumps(spec["messages"]), "truth": json.dumps(truth),
    }


def corpus(config: SyntheticConfig, split: str = "train") -> list[str]:
    """The text of every conversation of a split plus the prompt scaffolding (for tokenizer training)."""
    from molmo2_jax.preprocessing.chat_template import apply_chat_template

    texts = [apply_chat_template(make_spec(config, split, i)["messages"], add_generation_prompt=False)
             for i in range(config.num_train if split == "train" else config.num_eval)]
    # Timestamps the video prompt shows, and the multi-image labels of the chat template.
    texts.append(" ".join(f"{t:.1f}" for t in np.arange(0, 60, 0.5)))
    texts.append(" ".join(f"Image {i}" for i in range(1, 10)))
    return texts
