"""Training examples from Ai2's released datasets: hub rows (parquet / JSON on local disk, read with
`molmo2_jax.data.rows.read_rows`) with media in a local directory, turned into JSONL
manifest records (docs/data.md) the data pipeline reads.

    pixmo-points         image_url/image_sha256, label, points [{x, y}] on 0..100   -> pointing or counting
    pixmo-count          image_url/image_sha256, label, count, points {x: [..], y: [..]} on 0..100
    molmo2-videopoint    video_id, question, label, count, points per two_fps_timestamps on 0..100,
                         video_duration, clip_start/clip_end (a video over 63 s: only that clip)
    molmo2-videotrack    id, clip, fps, w, h, exp, mask_id, points [{object_id, points: [[x, y] | null]}]
    molmo2-track-instruction  clip/video, fps, sampling_fps, expression, mask_id, frame_trajectories
                         [{frame, time, points: [{id, point, occluded}]}] (molmo2-track-instruction)
    molmo2-humanqa       video_id, question, answer (Molmo2-AskModelAnything)       -> one conversation a video
    molmo2-capqa         video_id, Question, Answer, NegativeAnswers (Molmo2-VideoCapQA) -> likewise
    molmo2-subtitleqa    as molmo2-capqa plus subtitle [{start, end, text}] (Molmo2-VideoSubtitleQA)
                         -> likewise, with the video's subtitles
    molmo2-cap           video_id, video_caption, video_frame_merged_caption / merged_caption,
                         annotation_score (Molmo2-Cap)                              -> short and long caption
    molmo2-multiimagepoint  image_sha256s/image_urls (or images), labels, points per image on 0..100
                         (Molmo2-MultiImagePoint)                                   -> a turn per label
    molmo2-multiimageqa  image_urls (or image), qa_pairs {question, answer} (Molmo2-MultiImageQA)
    molmo2-synmultiimageqa  id, images (embedded), qa_pairs {question, explanation, answer}
                         (Molmo2-SynMultiImageQA; the images are written to the media directory)

Images are found in the media directory by the row's `image` path, its sha256 (a file named
`<sha256>` with any extension, as Ai2's download script saves them) or its URL's file name; videos
as `<video_id>.*` or `<clip>.*`, a missing tracking clip file as frames start_frame..end_frame of `<video>.*`
(the record's `clip`). Prompts are the first of the official template list of each task
(the official pipeline samples one). A row that cannot be used is skipped with its id and the reason.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from molmo2_jax.data.errors import BadExampleError, DataError
from molmo2_jax.data.manifest import check_subtitles
from molmo2_jax.data.rows import read_rows


class RowError(DataError):
    """A row that cannot become a training example; the message is the reason."""


def _find(media: Path, *names: str | None) -> Path:
    for name in names:
        if not name:
            continue
        if (media / name).is_file():
            return media / name
        found = sorted(p for p in media.glob(f"{Path(name).name}.*") if p.is_file())
        if found:
            return found[0]
    raise RowError(f"no media file for {' / '.join(n for n in names if n)} in {media}")


def _image(row: dict, media: Path) -> str:
    url_name = Path(row["image_url"]).name if row.get("image_url") else None
    return str(_find(media, row.get("image"), row.get("image_sha256"), url_name))


def _points_message(label: str, points: list[tuple[float, float]], style: str, **extra) -> dict:
    """An assistant turn with points given on Molmo2's 0..100 annotation scale."""
    return {"role": "assistant", "label": label, "format": "count" if style == "count" else "points",
            "units": "normalized", "points": [{"x": 10 * x, "y": 10 * y, **extra} for x, y in points]}


def _question(label: str, style: str, media_kind: str = "image") -> str:
    if style == "count":
        return f"How many {label} are there?"
    return f"Point to {label}\nPlease say 'There are none.' if it is not in the {media_kind}."


def pixmo_points(row: dict, media: Path, style: str) -> dict:
    points = [(p["x"], p["y"]) for p in row["points"]]
    return {"image": _image(row, media), "messages": [
        {"role": "user", "content": _question(row["label"], style)},
        _points_message(row["label"], points, style)]}


def pixmo_count(row: dict, media: Path, style: str) -> dict:
    xs, ys = row["points"]["x"], row["points"]["y"]
    if len(xs) != int(row["count"]):
        raise RowError(f"{len(xs)} points but count {row['count']}")
    return {"image": _image(row, media), "messages": [
        {"role": "user", "content": _question(row["label"], style)},
        _points_message(row["label"], list(zip(xs, ys)), style)]}


MAX_POINT_SECONDS = 63  # the official SFT's video pointing sets (vixmo_points_minmax_*: max_seconds=63)


def _videopoint_clip(row: dict) -> tuple[float, float] | None:
    """The part of a Molmo2-VideoPoint row's video the official SFT trains on (`Molmo2VideoPoint.load` in
    `olmo/data/molmo2_datasets.py`, max_seconds=63 with use_clips_from_metadata): a video of up to 63 s whole
    (None, whatever clip the row names), a longer one only through the row's clip_start..clip_end, which must
    lie in the video, last at most 63 s and hold every annotated time (0..63 s when there are none)."""
    duration = row["video_duration"]
    if duration <= MAX_POINT_SECONDS:
        return None
    start, end = row.get("clip_start"), row.get("clip_end")
    if start is None or end is None:
        raise RowError(f"a {duration} s video without clip bounds (the official training takes videos over "
                       f"{MAX_POINT_SECONDS} s only through their precomputed clips)")
    times = row["two_fps_timestamps"]
    first, last = (min(times), max(times)) if times else (0.0, MAX_POINT_SECONDS)
    if not (0 <= start <= first and last <= end <= duration and 0 < end - start <= MAX_POINT_SECONDS):
        raise RowError(f"the clip {start}-{end} s of the {duration} s video does not hold the annotated "
                       f"{first}-{last} s within {MAX_POINT_SECONDS} s (the official loader drops it)")
    return float(start), float(end)


def molmo2_videopoint(row: dict, media: Path, style: str) -> dict:
    """Points at their 2-fps times; of a video over 63 s only its clip, the times then counted from the clip's
    start and floored to the 0.5 s grid, as the official loader counts them."""
    if row.get("annotator_unsure"):
        raise RowError("annotator_unsure (the official training uses only sure rows)")
    if len(row["points"]) != len(row["two_fps_timestamps"]):
        raise RowError("points and two_fps_timestamps differ in length")
    clip = _videopoint_clip(row)
    offset = clip[0] if clip else 0.0
    points = [(math.floor((t - offset) / 0.5) * 0.5, p["x"], p["y"])
              for t, frame in zip(row["two_fps_timestamps"], row["points"]) for p in frame]
    message = {"role": "assistant", "label": row["label"], "units": "normalized",
               "format": "count" if style == "count" else "points",
               "points": [{"t": t, "x": 10 * x, "y": 10 * y} for t, x, y in points]}
    question = row["question"] if style == "count" and row.get("question") else _question(row["label"], style, "video")
    return {"video": str(_find(media, row["video_id"])), **({"clip": list(clip)} if clip else {}),
            "messages": [{"role": "user", "content": question}, message]}


def _track_video(row: dict, media: Path) -> dict:
    """A tracking row's video: the cut clip `<clip>.*` Ai2's download writes, else frames start_frame..end_frame
    of the source `<video>.*` (the cut it makes with ffmpeg, `_split_video_worker` in
    `olmo/data/molmo2_video_track_datasets.py`; the annotations' times count from its first frame)."""
    try:
        return {"video": str(_find(media, row.get("clip")))}
    except RowError:
        first, last = row.get("start_frame"), row.get("end_frame")
        if first is None or last is None or not row.get("video"):
            return {"video": str(_find(media, row.get("clip"), row.get("video")))}
    return {"video": str(_find(media, row["video"])), "clip": [first / row["fps"], (last + 1) / row["fps"]]}


def molmo2_videotrack(row: dict, media: Path, style: str, sampling_fps: int = 2) -> dict:
    fps = row["fps"]
    step = fps // sampling_fps
    if not step:
        raise RowError(f"fps {fps} is below the sampling rate {sampling_fps}")
    tracks = []
    for n, track in enumerate(row["points"], 1):
        points = [{"t": f / fps, "x": xy[0], "y": xy[1]} for f, xy in enumerate(track["points"])
                  if xy and f % step == 0]
        if points:
            tracks.append({"id": n, "points": points})
    return {**_track_video(row, media), "messages": [
        {"role": "user", "content": f"Track {row['exp']} in {sampling_fps} FPS."},
        {"role": "assistant", "label": row["exp"], "tracks": tracks}]}


def molmo2_track_instruction(row: dict, media: Path, style: str) -> dict:
    """Tracks from precomputed `frame_trajectories` (pixels at `time` seconds); occluded points are left out
    and objects are numbered in `mask_id` order from 1."""
    number = {str(object_id): n for n, object_id in enumerate(row["mask_id"], 1)}
    tracks: dict[int, list[dict]] = {}
    for frame in sorted(row["frame_trajectories"], key=lambda f: f["frame"]):
        for p in frame["points"]:
            if str(p["id"]) not in number:
                raise RowError(f"point of object {p['id']}, which mask_id does not list")
            if not p.get("occluded") and p.get("point") is not None:
                x, y = p["point"]
                tracks.setdefault(number[str(p["id"])], []).append({"t": frame["time"], "x": x, "y": y})
    return {**_track_video(row, media), "messages": [
        {"role": "user", "content": f"Track {row['expression']} in {row['sampling_fps']} FPS."},
        {"role": "assistant", "label": row["expression"],
         "tracks": [{"id": n, "points": points} for n, points in sorted(tracks.items())]}]}


def molmo2_cap(row: dict, media: Path, style: str, min_score: float = 3) -> dict:
    """The short caption and the long one (the frame-merged caption, else the merged one) of a video, as the
    official training mixes them (rows scored below 3 are left out, as there)."""
    if row.get("annotation_score") is not None and row["annotation_score"] < min_score:
        raise RowError(f"annotation_score {row['annotation_score']} is below {min_score}")
    messages = []
    for question, caption in (("Caption the video with 1 or two sentences", row.get("video_caption")),
                              ("Describe this video.",
                               row.get("video_frame_merged_caption") or row.get("merged_caption"))):
        if caption and caption.strip():
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": caption.strip()}]
    if not messages:
        raise RowError("no caption")
    return {"video": str(_find(media, row["video_id"])), "messages": messages}


def _images(row: dict, media: Path) -> list[str]:
    """A multi-image row's image files: its `images` / `image` paths, else by sha256, else by URL."""
    local = row.get("images") or row.get("image")
    if isinstance(local, list) and all(isinstance(p, str) for p in local):
        return [str(_find(media, p)) for p in local]
    urls, shas = list(row.get("image_urls") or []), list(row.get("image_sha256s") or [])
    if not urls and not shas:
        raise RowError("no images, image_urls or image_sha256s")
    if urls and shas and len(urls) != len(shas):
        raise RowError(f"{len(shas)} sha256s but {len(urls)} urls")
    count = max(len(urls), len(shas))
    urls, shas = urls or [None] * count, shas or [None] * count
    return [str(_find(media, sha, Path(url).name if url else None)) for sha, url in zip(shas, urls)]


def molmo2_multiimagepoint(row: dict, media: Path, style: str) -> dict:
    """A group of images: a turn per label (in order of first appearance) pointing at, or counting, its objects
    in all the images, each point with its image's index."""
    images = _images(row, media)
    labels, points = row["labels"], row["points"]
    keys = row.get("normalized_labels") or labels  # the official grouping key; `labels` are the readable ones
    if not len(images) == len(labels) == len(points) == len(keys):
        raise RowError(f"{len(images)} images, {len(labels)} labels and {len(points)} point lists should be as many")
    messages = []
    for key in dict.fromkeys(keys):
        label = labels[keys.index(key)]
        question = (f"How many {label} are there in all images?" if style == "count" else
                    f"Find {label} in all images.")
        found = [{"x": 10 * p["x"], "y": 10 * p["y"], "image": i}
                 for i, (k, image_points) in enumerate(zip(keys, points)) if k == key for p in image_points or []]
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "label": label, "format": "count" if style == "count" else "points",
                      "units": "normalized", "points": found}]
    return {"images": images, "messages": messages}


def molmo2_multiimageqa(row: dict, media: Path, style: str) -> dict:
    """An image set's question-answer pairs as one conversation; sets of one image are left out, as by the
    official loader."""
    images = _images(row, media)
    if len(images) < 2:
        raise RowError("a single image (the official loader takes sets of 2 or more)")
    pairs = row["qa_pairs"]
    messages = [m for q, a in zip(pairs["question"], pairs["answer"])
                for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    if not messages:
        raise RowError("no question")
    return {"images": images, "messages": messages}


def molmo2_synmultiimageqa(row: dict, media: Path, style: str, max_images: int = 5) -> dict:
    """A synthetic multi-page document's questions with the reasoning, as the official training asks them
    ("... Provide reasoning steps and then give the short answer." -> "<explanation> Answer: <answer>").
    Its embedded images are written to the media directory as `<id>-<n>.<ext>` (kept when already there);
    documents of more than 5 pages are left out, as by the official loader."""
    images = row["images"]
    if len(images) > max_images:
        raise RowError(f"{len(images)} images; the official loader takes at most {max_images}")
    paths = []
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not image.get("bytes"):
            raise RowError(f"image {n} is not embedded ({{'bytes': ...}})")
        suffix = Path(image.get("path") or "").suffix or ".png"
        path = media / f"{row['id']}-{n}{suffix}"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(image["bytes"])
            tmp.replace(path)
        paths.append(str(path))
    pairs = row["qa_pairs"]
    messages = [m for q, e, a in zip(pairs["question"], pairs["explanation"], pairs["answer"])
                for m in ({"role": "user", "content": f"{q} Provide reasoning steps and then give the short answer."},
                          {"role": "assistant", "content": f"{e} Answer: {a}" if e else a})]
    if not messages:
        raise RowError("no question")
    return {"images": paths, "messages": messages}


def molmo2_humanqa(rows: list[dict], media: Path, style: str) -> dict:
    """All of a video's human QA pairs as one conversation; pairs with an empty answer are dropped."""
    messages = []
    for row in rows:
        if row["answer"].strip():
            messages += [{"role": "user", "content": row["question"].strip()},
                         {"role": "assistant", "content": row["answer"].strip()}]
    if not messages:
        raise RowError("no answered question")
    return {"video": str(_find(media, rows[0]["video_id"])), "messages": messages}


def molmo2_capqa(rows: list[dict], media: Path, style: str) -> dict:
    """A video's multiple-choice questions as one conversation, in the official evaluation-style
    template ("Only return the correct answer option." then lettered options; the answer "B. text").
    The right option's place is drawn from a generator seeded by the question, so a rerun gives the
    same file (the official loader draws it unseeded)."""
    messages = []
    for row in rows:
        options = list(row["NegativeAnswers"])
        index = random.Random(f"{row['video_id']}|{row['Question']}").randint(0, len(options))
        options.insert(index, row["Answer"])
        letters = string.ascii_uppercase
        if len(options) > len(letters):
            raise RowError(f"{len(options)} options; at most {len(letters)} can be lettered")
        listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
        question = f"{row['Question']}\nOnly return the correct answer option.\n{listed}"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": f"{letters[index]}. {row['Answer']}"}]
    return {"video": str(_find(media, rows[0]["video_id"])), "messages": messages}


def molmo2_subtitleqa(rows: list[dict], media: Path, style: str) -> dict:
    """A video's multiple-choice questions as `molmo2_capqa` writes them, with the subtitles of its first row
    (the official loader's: all of a video's rows share them; a repeated (start, end) keeps its place and
    takes the later text, as its dict does). The pipeline writes them after the frames."""
    try:
        entries = check_subtitles(rows[0]["subtitle"], "the subtitle column")
    except BadExampleError as e:
        raise RowError(str(e)) from None
    by_time = {(e["start"], e["end"]): e["text"] for e in entries}
    return {**molmo2_capqa(rows, media, style),
            "subtitles": [{"start": s, "end": e, "text": text} for (s, e), text in by_time.items()]}


READERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "pixmo-points": (pixmo_points, ("label", "points")),
    "pixmo-count": (pixmo_count, ("label", "count", "points")),
    "molmo2-videopoint": (molmo2_videopoint, ("video_id", "label", "points", "two_fps_timestamps", "video_duration")),
    "molmo2-videotrack": (molmo2_videotrack, ("clip", "fps", "exp", "points")),
    "molmo2-track-instruction": (molmo2_track_instruction, ("fps", "sampling_fps", "expression", "mask_id",
                                                            "frame_trajectories")),
    "molmo2-humanqa": (molmo2_humanqa, ("video_id", "question", "answer")),
    "molmo2-capqa": (molmo2_capqa, ("video_id", "Question", "Answer", "NegativeAnswers")),
    "molmo2-subtitleqa": (molmo2_subtitleqa, ("video_id", "Question", "Answer", "NegativeAnswers", "subtitle")),
    "molmo2-cap": (molmo2_cap, ("video_id", "video_caption")),
    "molmo2-multiimagepoint": (molmo2_multiimagepoint, ("labels", "points")),
    "molmo2-multiimageqa": (molmo2_multiimageqa, ("qa_pairs",)),
    "molmo2-synmultiimageqa": (molmo2_synmultiimageqa, ("id", "images", "qa_pairs")),
}
# Schemas whose rows are grouped by video into one multi-turn example, as the official loaders do
BY_VIDEO = {"molmo2-humanqa", "molmo2-capqa", "molmo2-subtitleqa"}


def manifest_records(schema: str, data: str | Path, media: str | Path, *, style: str = "point",
                     log: Callable[[str], None] | None = print) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Manifest records of a released data file, and (id, reason) of the rows skipped."""
    if schema not in READERS:
        raise DataError(f"unknown schema {schema!r}; choose one of {', '.join(READERS)}")
    if style not in ("point", "count"):
        raise DataError(f"style must be 'point' or 'count', got {style!r}")
    media = Path(media)
    if not media.is_dir():
        raise DataError(f"media directory {media} not found")
    reader, required = READERS[schema]
    rows = read_rows(data)
    if rows and (missing := [f for f in required if f not in rows[0]]):
        raise DataError(f"{data}: not a {schema} file: rows lack {', '.join(missing)} "
                        f"(they have {', '.join(sorted(rows[0]))})")
    if schema in BY_VIDEO:  # one item per video, in order of first appearance
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(str(row["video_id"]), []).append(row)
        items = [(video_id, group) for video_id, group in groups.items()]
    else:
        items = [(str(row.get("id", row.get("example_id", n))), row) for n, row in enumerate(rows)]
    records, skipped = [], []
    for n, (row_id, row) in enumerate(items):
        try:
            records.append({"id": row_id, **reader(row, media, style)})
        except (RowError, KeyError, TypeError, ValueError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            skipped.append((row_id, reason))
            if log:
                log(f"{data}: skipping {'video' if schema in BY_VIDEO else 'row'} {n} (id {row_id}): {reason}")
    return records, skipped


def write_manifest(records: list[dict[str, Any]], out: str | Path) -> None:
    """Write records as a JSONL manifest: to a temporary name, then renamed."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
