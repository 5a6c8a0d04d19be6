"""The released Molmo2 chat template's behaviour, in Python (spec 4.6).

Layout: media placeholders (`<|image|>`, or `Image N<|image|>` for several images, then one
`<|video|>` per video), an optional leading `subtitle` message verbatim, then alternating
user / assistant turns. BOS is not part of the template; the processor prepends it.
"""

from __future__ import annotations

from typing import Any, Sequence

from molmo2_jax.preprocessing.errors import PromptError

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"

# Task styles the released template leaves implicit; any other `style` is written as "{style}: ".
DEMO_STYLES = frozenset({
    "point_count", "pointing", "cosyn_point", "user_qa", "long_caption", "short_caption",
    "video_long_caption", "video_short_caption", "video_point_track_per_frame",
    "video_point_track_start_end", "video_point_track_all_frames",
    "video_single_point_track_start_end", "video_transcript", "video_clip_caption_start_end",
    "video_clip_caption_start_end_in_seconds", "video_clip_transcript_start_end",
    "video_clip_transcript_start_end_in_seconds", "video_frame_caption_timestamp",
    "video_frame_caption_timestamp_in_seconds", "correction_qa", "text_sft", "video_point",
    "video_point_count", "video_count", "video_count_point", "multi_image_pointing",
    "multi_image_counting", "multi_image_point_then_count", "multi_image_count_then_point", "demo",
    "a_okvqa_mc", "ai2_diagram_no_letter", "ai2_diagram", "science_qa", "multi_image_mc",
    "multi_image_mc_exp", "mantis_instruct_mc", "video_multiple_choice",
    "video_multiple_choice_count_without_pointing", "video_multiple_choice_multiple_correct",
    "video_multiple_choice_w_subtitle",
})


def _media_kind(part: dict[str, Any]) -> str | None:
    if part.get("type") == "image" or "image" in part or "image_url" in part:
        return "image"
    if part.get("type") == "video" or "video" in part or "video_url" in part:
        return "video"
    return None


def _message_text(content: str | Sequence[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    segments = []
    for part in content:
        if part.get("type") != "text":
            continue
        style = part.get("style")
        segments.append(f"{style}: {part['text']}" if style is not None and style not in DEMO_STYLES else part["text"])
    return " ".join(segments)


def count_media(messages: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Number of image parts and video parts over all messages."""
    n_images = n_videos = 0
    for message in messages:
        if isinstance(message.get("content"), str):
            continue
        for part in message.get("content") or []:
            kind = _media_kind(part)
            n_images += kind == "image"
            n_videos += kind == "video"
    return n_images, n_videos


def apply_chat_template(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render `messages` (dicts with `role` and `content`: a string or a list of typed parts) to a prompt."""
    if not messages:
        raise PromptError("messages: the conversation is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PromptError(f"messages[{i}] must be a dict with 'role' and 'content'")
    n_images, n_videos = count_media(messages)
    out = []
    if n_images == 1:
        out.append(IMAGE_PLACEHOLDER)
    else:
        out.extend(f"Image {i + 1}{IMAGE_PLACEHOLDER}" for i in range(n_images))
    out.append(VIDEO_PLACEHOLDER * n_videos)

    has_subtitle = messages[0]["role"].lower() == "subtitle"
    if has_subtitle:
        out.append(messages[0]["content"])
    turns = [m for m in messages if m["role"].lower() != "subtitle"]
    for i, message in enumerate(turns):
        role = message["role"].lower()
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise PromptError(
                f"messages: conversation roles must alternate user/assistant/...; "
                f"turn {i} is {role!r}, expected {expected!r}")
        text = _message_text(message["content"])
        if role == "user":
            if i > 0:
                out.append("<|im_end|>\n")
            out.append(f"<|im_start|>user\n{text}<|im_end|>\n")
        else:
            out.append(f"<|im_start|>assistant\n{text}")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
