"""Conversations with media -> token ids, multimodal flags, per-token loss weights and vision inputs.

The prompt follows the released chat template (the text between assistant answers is taken from
`apply_chat_template` itself); each assistant answer is followed by EOS and only answer tokens and that
EOS carry loss. Weighting as in Molmo2 training: every token of an answer gets `2 / sqrt(n)` (n = the
answer's loss tokens) times `1 / sqrt(k)` when the media carry k > 1 annotations (assistant turns),
times the example's `loss_multiplier`. Structured targets (points, tracks) are written with the
grounding formatters on the 0..1000 scale.

A video's subtitles (a leading `{"role": "subtitle", "subtitles": [{start, end, text}]}` message) are
written as Ai2's preprocessing writes them (`olmo/preprocessing/video_preprocessor.py`, `subtitle_mode`
"frame_1", the released default): after all the frames, not between them, one block "subtitle\n" then
"{start:.1f} - {end:.1f} {text}\n" for each subtitle within 1 s of a sampled frame. The block goes where
the released chat template puts a leading `subtitle` message: after the media, before the first user turn.
Of a clip, the frame times count from its start and the subtitles are matched against them unshifted, as
Ai2's preprocessing matches them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molmo2_jax.data.errors import BadExampleError
from molmo2_jax.data.manifest import check_clip, check_subtitles
from molmo2_jax.grounding import Point, Track, format_count, format_points, format_tracks
from molmo2_jax.preprocessing import DecodedVideo, Molmo2Processor, decode_video, load_image
from molmo2_jax.preprocessing.chat_template import apply_chat_template

COUNT_FORMATS = {"points": None, "count": "point_then_count", "point_then_count": "point_then_count",
                 "count_then_point": "count_then_point"}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadExampleError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _points(items: Any, what: str, video: bool) -> list[Point]:
    if not isinstance(items, list):
        raise BadExampleError(f"{what} must be a list of points")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, dict) or "x" not in p or "y" not in p:
            raise BadExampleError(f"{what}[{i}] must be an object with 'x' and 'y', got {p!r}")
        x, y = _number(p["x"], f"{what}[{i}].x"), _number(p["y"], f"{what}[{i}].y")
        if video:
            out.append(Point(x, y, time=_number(p.get("t"), f"{what}[{i}].t")))
        else:
            image = p.get("image", 0)
            if not isinstance(image, int) or isinstance(image, bool):
                raise BadExampleError(f"{what}[{i}].image must be a 0-based image index, got {image!r}")
            out.append(Point(x, y, image=image))
    return out


def answer_text(message: dict[str, Any], image_sizes: list[tuple[int, int]], video_size: tuple[int, int] | None,
                what: str) -> str:
    """The assistant text of a message: `content` as is, or `points` / `tracks` formatted.

    Coordinates are pixels of the original media unless the message says `"units": "normalized"` (0..1000).
    """
    if "content" in message:
        if not isinstance(message["content"], str):
            raise BadExampleError(f"{what}.content must be a string")
        return message["content"]
    label = message.get("label", "")
    if not isinstance(label, str):
        raise BadExampleError(f"{what}.label must be a string")
    normalized = message.get("units", "pixels") == "normalized"
    if message.get("units", "pixels") not in ("pixels", "normalized"):
        raise BadExampleError(f"{what}.units must be 'pixels' or 'normalized'")
    video = video_size is not None
    sizes = {} if normalized else ({"video_size": video_size} if video else {"image_sizes": image_sizes})
    try:
        if "tracks" in message:
            if not video:
                raise BadExampleError(f"{what}: tracks need a video")
            tracks = message["tracks"]
            if not isinstance(tracks, list) or not all(isinstance(t, dict) for t in tracks):
                raise BadExampleError(f"{what}.tracks must be a list of objects")
            parsed = [Track(int(t.get("id", n + 1)),
                            [(p.time, p.x, p.y) for p in _points(t.get("points"), f"{what}.tracks[{n}].points", True)])
                      for n, t in enumerate(tracks)]
            return format_tracks(label, parsed, **sizes)
        fmt = message.get("format", "points")
        if fmt not in COUNT_FORMATS:
            raise BadExampleError(f"{what}.format must be one of {sorted(COUNT_FORMATS)}, got {fmt!r}")
        points = _points(message["points"], f"{what}.points", video)
        # Video frames listed in "frame_times" keep their group when they have no point (official format).
        sizes["frame_times"] = message.get("frame_times")
        if COUNT_FORMATS[fmt] is None:
            return format_points(label, points, **sizes)
        return format_count(label, points, mode=COUNT_FORMATS[fmt], **sizes)
    except BadExampleError:
        raise
    except ValueError as e:  # GroundingError names the point
        raise BadExampleError(f"{what}: {e}") from None


SUBTITLE_WINDOW = 1.0  # seconds; "frame_1"


def subtitle_text(subtitles: Sequence[dict[str, Any]], frame_times: Sequence[float]) -> str:
    """The subtitle block of a video whose frames are shown at `frame_times` (seconds)."""
    w = SUBTITLE_WINDOW
    kept = [s for s in subtitles if any(s["start"] <= t + w and t - w <= s["end"] for t in frame_times)]
    return "subtitle\n" + "".join(f"{s['start']:.1f} - {s['end']:.1f} {s['text']}\n" for s in kept)


def _segments(messages: list[dict[str, Any]], eos: str) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of the whole conversation, in order, rendered by the chat template."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_chat_template(messages[:k], add_generation_prompt=True)
        full = apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise BadExampleError("chat template output is not incremental; cannot place the loss mask")
        context = prompt[len(done):]
        if pieces and context.startswith(eos):  # the template reopens a user turn with the EOS we appended
            context = context[len(eos):]
        pieces += [(context, False), (full[len(prompt):], True)]
        done = full
    return pieces


def _video_size(source: Any, name: str) -> tuple[int, int]:
    """(width, height) of a video's frames, from the stream header."""
    import io

    import av

    if isinstance(source, DecodedVideo):
        return source.frames.shape[2], source.frames.shape[1]
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError, IndexError) as e:
        raise BadExampleError(f"cannot decode video {name}: {e}") from None


def tokenize_conversation(
    processor: Molmo2Processor,
    messages: Sequence[dict[str, Any]],
    images: Sequence[Any] = (),
    video: Any = None,
    *,
    name: str = "example",
    loss_multiplier: float = 1.0,
    max_crops: int | None = None,
    clip: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One conversation (user/assistant turns, after an optional leading subtitle message; media belong to
    the first user turn) -> a model example. With `clip` (start, end seconds) only that part of the video
    file is shown, and every time in the conversation counts from the clip's start (`decode_video(clip=)`).

    Returns `input_ids`, `mm_token_type_ids` (int32 `[T]`), `token_weights` (float32 `[T]`, the loss
    weight of predicting each token), the processor's vision arrays (`pixel_values`,
    `image_token_pooling`, `pixel_values_videos`, `video_token_pooling`, pooling local to the example),
    `video_patch_mask` (int32 `[T]`) when it has images and a video, and `name`. Raises `BadExampleError` naming
    `name` and the problem.
    """
    messages = list(messages)
    subtitles = None
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "subtitle":
        if video is None:
            raise BadExampleError(f"{name}: subtitles need a video")
        subtitles, messages = check_subtitles(messages[0].get("subtitles"), name), messages[1:]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadExampleError(f"{name}: messages[{i}] must be an object with role 'user' or 'assistant'")
    if not messages or messages[-1]["role"] != "assistant":
        raise BadExampleError(f"{name}: the conversation must end with an assistant message")
    if clip is not None:
        if video is None or isinstance(video, DecodedVideo):
            raise BadExampleError(f"{name}: a clip needs a video file (or its bytes) to cut it from")
        clip = check_clip(clip, name)
    try:
        arrays = [load_image(img, name=f"{name}: images[{i}]" if not isinstance(img, (str, Path)) else None)
                  for i, img in enumerate(images)]
        video_size = None
        if video is not None and not isinstance(video, DecodedVideo):
            label = f"{name}: video" if isinstance(video, bytes) else str(video)
            vc = processor.video_config
            decoded = decode_video(video, num_frames=vc.num_frames, max_fps=vc.max_fps, resize_to=vc.size, name=label,
                                   clip=clip)
            video_size, video = _video_size(video, label), decoded
        elif video is not None:
            video_size = _video_size(video, name)
        sizes = [(a.shape[1], a.shape[0]) for a in arrays]
        chat = []
        for i, m in enumerate(messages):
            text = answer_text(m, sizes, video_size, f"{name}: messages[{i}]") if m["role"] == "assistant" \
                else m.get("content")
            if not isinstance(text, str):
                raise BadExampleError(f"{name}: messages[{i}].content must be a string")
            chat.append({"role": m["role"], "content": text})
        media = [{"type": "image"}] * len(arrays) + ([{"type": "video"}] if video is not None else [])
        chat[0] = {"role": chat[0]["role"], "content": media + [{"type": "text", "text": chat[0]["content"]}]}
        if subtitles:  # an empty list writes nothing, as Ai2's preprocessing
            chat.insert(0, {"role": "subtitle", "content": subtitle_text(subtitles, video.timestamps)})

        tokenizer = processor.tokenizer
        pieces = _segments(chat, tokenizer.eos_token)
        first = processor(pieces[0][0], images=arrays or None, videos=[video] if video is not None else None,
                          max_crops=max_crops)
    except (BadExampleError, OSError) as e:
        raise BadExampleError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    except ValueError as e:  # preprocessing / prompt errors name the input; add the example
        raise BadExampleError(f"{name}: {e}") from None

    ids = [first["input_ids"][0].astype(np.int32)]
    weights = [np.zeros(ids[0].shape, np.float32)]
    n_answers = sum(is_answer for _, is_answer in pieces)
    per_example = loss_multiplier / (math.sqrt(n_answers) if n_answers > 1 else 1.0)
    for text, is_answer in pieces[1:]:
        tokens = np.asarray(tokenizer.encode(text) + ([tokenizer.eos_token_id] if is_answer else []), np.int32)
        ids.append(tokens)
        weights.append(np.full(tokens.shape, 2.0 / math.sqrt(len(tokens)) * per_example if is_answer else 0.0,
                               np.float32))
    input_ids = np.concatenate(ids)
    example = {"name": name, "input_ids": input_ids, "token_weights": np.concatenate(weights),
               "mm_token_type_ids": np.isin(input_ids, processor.mm_token_ids).astype(np.int32)}
    for key in ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling"):
        if key in first:
            example[key] = first[key].astype(np.int32) if "pooling" in key else first[key]
    if "video_patch_mask" in first:  # images and a video: which patches are the video's
        example["video_patch_mask"] = np.pad(first["video_patch_mask"][0].astype(np.int32),
                                             (0, len(input_ids) - first["input_ids"].shape[1]))
    return example
