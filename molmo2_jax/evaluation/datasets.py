"""Readers for the released Molmo2 evaluation sets, from the hub's parquet / JSON files on local disk,
giving the truths the metrics take. One reader per scoring task:

    pointing        allenai/pixmo-points-eval     points (0..100), masks [n, H, W]
    point_bench     PointArena data.json          category, image_filename, mask_filename (+ --media)
    count           allenai/pixmo-count, CountBench   count
    video_count     allenai/Molmo2-VideoCountEval count, category; only the clip clip_start..clip_end is shown
    video_pointing  allenai/Molmo2-VideoPointEval points (px), masks [{frame_id, rle}], two_fps_timestamps
    tracking        allenai/Molmo2-VideoTrackEval fps, w, h, mask_id, points, masks; the video is the cut
                    `<clip>.*`, else frames start_frame..end_frame of the source `<video>.*`

The synthetic set (`evaluation.synthetic`) is read too. An example's id is the row's `id` (or
`example_id`), else its 0-based row index. A row that cannot be used is skipped with its id and the
reason; a file in another schema is an error naming the missing fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molmo2_jax.data.rows import DatasetError, read_rows
from molmo2_jax.errors import Molmo2Error

from . import metrics


class MaskSizeError(Molmo2Error):
    """A ground-truth mask whose size is not the image's: the data is wrong, so scoring stops."""


@dataclass
class Example:
    """One evaluation example: its truth for the metrics and, when the media directory has them, the
    question and media (a file or its bytes) a model is asked (`eval`), with the (start, end) seconds of
    the video the model sees when the row names a clip."""

    id: str
    truth: Any
    question: str = ""
    image: Path | bytes | None = None
    video: Path | bytes | None = None
    clip: tuple[float, float] | None = None


# The fields each task's reader needs; a file lacking one of them is in another schema.
REQUIRED = {
    "pointing": ("points", "masks"),
    "point_bench": ("category", "image_filename", "mask_filename"),
    "count": ("count",),
    "video_count": ("count", "category"),
    "video_pointing": ("points", "masks", "two_fps_timestamps", "width", "height", "video_duration"),
    "tracking": ("fps", "w", "h", "mask_id", "points", "masks"),
}

# Molmo2-VideoTrackEval configs by source dataset
TRACK_CATEGORIES = {"APTv2": "animal", "dancetrack": "dance", "sportsmot": "sports",
                    "personpath22": "person", "sav": "misc"}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _find_image(row: dict, media: Path | None) -> Path | None:
    """The row's image in the media directory, if there: its `image` path, else a file named by its
    sha256, else its URL's file name."""
    if media is None:
        return None
    if row.get("image") and (media / row["image"]).is_file():
        return media / row["image"]
    for name in (row.get("image_sha256"), Path(row["image_url"]).name if row.get("image_url") else None):
        found = sorted(p for p in media.glob(f"{name}*") if p.is_file()) if name else []
        if found:
            return found[0]
    return None


def _pointing(row: dict, media: Path | None) -> metrics.PointingTruth:
    masks = np.asarray(row["masks"], dtype=bool)
    points = np.array([[p["x"], p["y"]] for p in row["points"]], dtype=float).reshape(-1, 2)
    image = _find_image(row, media)
    if masks.ndim == 3 and masks.shape[0]:
        height, width = masks.shape[1:]
        if image is not None and _image_size(image) != (width, height):
            raise MaskSizeError(f"mask size {width}x{height} disagrees with image {image} "
                             f"({'x'.join(map(str, _image_size(image)))})")
    elif image is not None:
        width, height = _image_size(image)
    else:  # no object and no image: only whether points were predicted matters
        width, height = 1000, 1000
    if len(points) != len(masks):
        raise ValueError(f"{len(points)} points but {len(masks)} masks")
    return metrics.PointingTruth(points * np.array([width, height]) / 100, masks, (width, height))


def _point_bench(row: dict, media: Path | None) -> metrics.PointBenchTruth:
    if media is None:
        raise ValueError("point_bench needs --media (the directory holding selected_images/ and selected_masks/)")
    from PIL import Image

    image = media / "selected_images" / row["category"] / row["image_filename"]
    mask_path = media / "selected_masks" / row["category"] / row["mask_filename"]
    if not image.is_file() or not mask_path.is_file():
        raise ValueError(f"{image if not image.is_file() else mask_path} not found")
    with Image.open(mask_path) as m:
        mask = np.asarray(m)
    mask = mask > 127 if mask.ndim == 2 else np.any(mask > 127, axis=2)  # white = inside, as PointArena
    size = _image_size(image)
    if mask.shape[::-1] != size:  # some released PointBench masks are; the official scorer warns and goes on
        print(f"warning: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image} is "
              f"{size[0]}x{size[1]}; points outside the mask count as misses")
    return metrics.PointBenchTruth(mask, size, row["category"])


def _count(row: dict, media: Path | None) -> int:
    return int(row["count"])


def _video_count(row: dict, media: Path | None) -> tuple[int, str]:
    return int(row["count"]), row["category"]


def _video_pointing(row: dict, media: Path | None) -> metrics.VideoPointTruth:
    timestamps, points = row["two_fps_timestamps"], row["points"]
    if len(timestamps) != len(points) or len(points) != len(row["masks"]):
        raise ValueError(f"{len(points)} points, {len(timestamps)} timestamps and {len(row['masks'])} masks "
                         "should be as many")
    width, height = int(row["width"]), int(row["height"])
    tubelets = []
    for per_point in row["masks"]:
        tubelet = {}
        for mask in per_point:
            if tuple(mask["rle"]["size"]) != (height, width):
                raise MaskSizeError(f"mask size {mask['rle']['size'][1]}x{mask['rle']['size'][0]} disagrees with "
                                 f"the video's {width}x{height}")
            tubelet[mask["frame_id"] / 2.0] = mask["rle"]  # frames of the 2-fps annotation
        tubelets.append(tubelet)
    return metrics.VideoPointTruth([(t, p["x"], p["y"]) for t, p in zip(timestamps, points)], tubelets,
                                   width, height, float(row["video_duration"]))


def _tracking(row: dict, media: Path | None, sampling_fps: int) -> metrics.TrackTruth:
    fps, width, height = row["fps"], int(row["w"]), int(row["h"])
    index = {mask_id: n for n, mask_id in enumerate(row["mask_id"])}
    frames: dict[int, dict[int, tuple[float, float]]] = {}
    for track in row["points"]:
        for frame, point in enumerate(track["points"]):
            if point:
                frames.setdefault(frame, {})[index[track["object_id"]]] = tuple(point)
    step = fps // sampling_fps  # the truth is scored on the frames sampled at `sampling_fps`
    if not step:
        raise ValueError(f"fps {fps} is below the sampling rate {sampling_fps}")
    masks = {m["object_id"]: m["masks"] for m in row["masks"]}
    if len(masks) != len(row["mask_id"]):
        raise ValueError(f"{len(masks)} mask tracks but {len(row['mask_id'])} mask ids")
    for per_frame in masks.values():
        for mask in per_frame:
            if isinstance(mask, dict) and tuple(mask["size"]) != (height, width):
                raise MaskSizeError(f"mask size {mask['size'][1]}x{mask['size'][0]} disagrees with the video's "
                                 f"{width}x{height}")
    return metrics.TrackTruth(sorted((f, p) for f, p in frames.items() if f % step == 0), masks, width, height,
                              fps, TRACK_CATEGORIES.get(row.get("video_dataset")))


def _find_video(media: Path | None, *names: str | None) -> Path | None:
    if media is None:
        return None
    for name in names:
        if name:
            found = sorted(p for p in media.glob(f"{name}.*") if p.is_file())
            if found:
                return found[0]
    return None


def _clip(row: dict) -> tuple[float, float] | None:
    """A VideoCountEval row's clip (the official eval decodes only it; the answer's times count from its
    start), checked against the row's `video_duration`."""
    if row.get("clip_start") is None or row.get("clip_end") is None:
        return None
    start, end, duration = float(row["clip_start"]), float(row["clip_end"]), row.get("video_duration")
    if not 0 <= start < end or (duration is not None and start >= float(duration)):
        raise ValueError(f"clip {start}-{end} s is not inside the {duration} s video")
    return start, end


def _prompt(task: str, row: dict, media: Path | None, sampling_fps: int) -> tuple:
    """(question, image, video, clip) a model is asked for `row`, as the official eval asks them (the first
    of the official prompt templates where it samples one)."""
    if task == "pointing":
        return (f"Point to {row.get('label', '')}\nPlease say 'There are none.' if it is not in the image.",
                _find_image(row, media), None)
    if task == "point_bench":
        image = media / "selected_images" / row["category"] / row["image_filename"] if media else None
        return row.get("user_input", ""), image, None
    if task == "count":
        return row.get("question") or f"How many {row.get('label', '')} are there?", _find_image(row, media), None
    if task == "video_count":
        return row.get("question", ""), None, _find_video(media, row.get("video_id")), _clip(row)
    if task == "video_pointing":
        return (f'How many "{row.get("label", "")}" are there in the video?', None,
                _find_video(media, row.get("video_id")))
    question = f"Track {row.get('exp', '')} in {sampling_fps} FPS."
    clip_file = _find_video(media, row.get("clip"))
    if clip_file is not None or media is None:
        return question, None, clip_file
    # Only the source video: its frames start_frame..end_frame, the clip Ai2's download cuts with ffmpeg
    # (`molmo2_video_track_datasets.py`), whose frame 0 the truth's frame 0 is
    fps, first, last = row.get("fps"), row.get("start_frame"), row.get("end_frame")
    clip = None if first is None or last is None else (first / fps, (last + 1) / fps)
    return question, None, _find_video(media, row.get("video")), clip


def read_examples(task: str, data: str | Path, media: str | Path | None = None, *, sampling_fps: int = 1,
                  log: Callable[[str], None] | None = print) -> tuple[list[Example], list[tuple[str, str]]]:
    """The task's examples from the data file, and (id, reason) of the rows skipped. `data` may also be a
    synthetic set (`molmo2-jax build-synthetic`): its validation split's examples of the task."""
    if task not in REQUIRED:
        raise DatasetError(f"unknown task {task!r}; choose one of {', '.join(REQUIRED)}")
    from . import synthetic

    if synthetic.is_synthetic(data):
        if task not in synthetic.TASKS.values():
            raise DatasetError(f"{data}: a synthetic set has no {task} examples; its tasks are "
                               f"{', '.join(synthetic.TASKS.values())}")
        return synthetic.read_examples(data)[task], []
    rows = read_rows(data)
    if rows:
        missing = [f for f in REQUIRED[task] if f not in rows[0]]
        if missing:
            raise DatasetError(f"{data}: not a {task} data file: rows lack {', '.join(missing)} "
                               f"(they have {', '.join(sorted(rows[0]))})")
    media = Path(media) if media is not None else None
    reader = {"pointing": _pointing, "point_bench": _point_bench, "count": _count, "video_count": _video_count,
              "video_pointing": _video_pointing,
              "tracking": lambda row, m: _tracking(row, m, sampling_fps)}[task]
    examples, skipped, seen = [], [], set()
    for n, row in enumerate(rows):
        example_id = str(row.get("id", row.get("example_id", n)))
        try:
            if example_id in seen:
                raise ValueError("an earlier row has the same id")
            seen.add(example_id)
            examples.append(Example(example_id, reader(row, media), *_prompt(task, row, media, sampling_fps)))
        except MaskSizeError as e:
            raise DatasetError(f"{data}: row {n} (id {example_id}): {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            skipped.append((example_id, reason))
            if log:
                log(f"skipping row {n} (id {example_id}): {reason}")
    return examples, skipped
