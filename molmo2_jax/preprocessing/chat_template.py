"""Molmo2 chat templates: the template a checkpoint ships, rendered as transformers renders it, and
the released template's behaviour restated in Python for directories that ship none.

Released layout: media placeholders (`<|image|>`, or `Image N<|image|>` for several images, then one
`<|video|>` per video), an optional leading `subtitle` message verbatim, then alternating
user / assistant turns. BOS is not part of the template; the processor prepends it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from molmo2_jax.preprocessing.errors import PromptError, TokenizerLoadError

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
    text = ""
    for part in content:
        if part.get("type") != "text":
            continue
        # Any `style` key counts, None included ("None: ..."), as in the released template.
        text_of_part = part.get("text", "")  # a missing text renders empty, like Jinja's undefined
        segment = f"{part['style']}: {text_of_part}" if "style" in part and part["style"] not in DEMO_STYLES \
            else str(text_of_part)
        text = f"{text} {segment}" if text else segment  # the separator follows non-empty text only
    return text


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


def apply_chat_template(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, *,
                        assistant_space: bool = False) -> str:
    """Render `messages` (dicts with `role` and `content`: a string or a list of typed parts) to a prompt.

    `assistant_space`: write the space the released template puts before every assistant turn taken
    from a message (transformers renders it); Molmo2's training formatter has no such space, so the
    default is the training layout.
    """
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
        out.append(str(messages[0]["content"]))
    for i, message in enumerate(messages):
        role = message["role"].lower()
        if role == "subtitle":  # skipped, but still counted when turns are numbered (as released)
            continue
        turn = i - has_subtitle
        expected = "user" if turn % 2 == 0 else "assistant"
        if role != expected:
            raise PromptError(
                f"messages: conversation roles must alternate user/assistant/...; "
                f"messages[{i}] is {role!r}, expected {expected!r}")
        text = _message_text(message["content"])
        if role == "user":
            if turn > 0:
                out.append("<|im_end|>\n")
            out.append(f"<|im_start|>user\n{text}<|im_end|>\n")
        else:
            out.append(f"{' ' if assistant_space else ''}<|im_start|>assistant\n{text}")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# The checkpoint's own template

# Where a checkpoint keeps its template, in the order transformers' processor looks (a
# `chat_template` key in processor_config.json, the legacy chat_template.json, chat_template.jinja);
# the processor never reads tokenizer_config.json, the tokenizer does (after chat_template.jinja).
TEMPLATE_LOCATIONS = (("processor_config.json", "chat_template"), ("chat_template.json", "chat_template"),
                      ("chat_template.jinja", None), ("tokenizer_config.json", "chat_template"))
# The named special tokens transformers passes to every template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: plain json.dumps, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    """The environment and globals transformers compiles chat templates with."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _plain(value: Any) -> Any:
    """Only plain JSON-like data enters the sandbox: media objects become inert `<TypeName>` strings."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, numpy scalars) lose their methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _normalize(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template: None-valued keys dropped, OpenAI `image_url`
    parts turned into `{"type": "image", "url": ...}`, plain data only."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_hf_image_part(part) for part in message["content"]]
        out.append(_plain(message))
    return out


def _hf_image_part(part: Any) -> Any:
    """An OpenAI `{"type": "image_url", "image_url": {"url": ...}}` part as transformers rewrites it."""
    if not (isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part):
        return part
    url = part["image_url"]
    return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}


class ChatTemplate:
    """A Jinja chat template, rendered with the environment and variables transformers uses."""

    def __init__(self, text: str, source: str = "<string>", special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerLoadError(f"{source}: bad chat template at line {e.lineno}: {e.message}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The prompt; an error the template raises (e.g. roles out of order) is a one-line `PromptError`."""
        if not messages:
            raise PromptError("messages: the conversation is empty")
        try:
            return self._template.render(messages=_normalize(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            message = " ".join(str(e.message).splitlines())
            raise PromptError(f"messages: {message} (chat template {self.source})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from None


def _default_template(value: Any, source: str) -> str:
    """The template transformers renders when several are stored: the one named "default"."""
    if isinstance(value, list):  # tokenizer_config.json: [{"name": ..., "template": ...}, ...]
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    if not isinstance(value, str):
        raise TokenizerLoadError(f"{source}: chat_template must be a string or hold one named 'default'")
    return value


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The template a checkpoint directory ships (see `TEMPLATE_LOCATIONS`), or None."""
    directory = Path(directory)
    for name, key in TEMPLATE_LOCATIONS:
        path = directory / name
        if key is None:
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        else:
            value = _read_json(path).get(key)
            text = None if value is None else _default_template(value, str(path))
        if text is not None:
            break
    else:
        return None
    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    # AddedToken-style entries are dicts with the string under "content"
    tokens = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL_TOKEN_NAMES}
    return ChatTemplate(text, str(path), {k: str(v) for k, v in tokens.items() if v is not None})
