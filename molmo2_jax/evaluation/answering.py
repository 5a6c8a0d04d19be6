"""A model's greedy answers to evaluation questions (`datasets.Example`: a question with an image or a
video, each a path or bytes; of a video only the example's clip, when it has one), several prompts at a
time: one `generate` call answers a batch, its rows left-padded to the longest prompt."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .datasets import Example


def _source(media: Path | bytes) -> str | bytes:
    return media if isinstance(media, bytes) else str(media)


def answer(model, processor, examples: Sequence[Example], *, max_new_tokens: int, max_crops: int | None = None,
           video_fps: float | None = None, batch_size: int | None = None) -> list[str]:
    """The greedy answers to `examples` (one batch), in order. `max_crops` and `video_fps` (frames sampled per
    second, at most) override the processor's settings. A batch shorter than `batch_size` is filled with
    copies of its last question, whose answers are dropped: every batch then has one shape, and a short last
    batch costs no compilation of its own."""
    from molmo2_jax.preprocessing import VideoDecodeError, decode_video, load_image

    prompts, images, videos = [], [], []
    cfg = processor.video_config
    for example in examples:
        if example.image is not None:
            images.append(load_image(_source(example.image)))
        if example.video is not None:
            try:
                videos.append(decode_video(_source(example.video), num_frames=cfg.num_frames, clip=example.clip,
                                           max_fps=video_fps or cfg.max_fps, resize_to=cfg.size))
            except VideoDecodeError as e:
                raise VideoDecodeError(f"example {example.id}: {e}") from None
        content = [{"type": "image"}] * (example.image is not None) + [{"type": "video"}] * (
            example.video is not None) + [{"type": "text", "text": example.question}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}]))
    n, fill = len(prompts), max(0, (batch_size or 0) - len(prompts))
    prompts += prompts[-1:] * fill
    images += images[-1:] * fill if examples[-1].image is not None else []
    videos += videos[-1:] * fill if examples[-1].video is not None else []
    inputs = processor(prompts, images=images or None, videos=videos or None, max_crops=max_crops if images else None)
    return model.generate(inputs, max_new_tokens=max_new_tokens, tokenizer=processor.tokenizer).texts[:n]


def batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """`examples` in batches of at most `size`, image questions and video questions apart (a batch mixing
    them would run every row through both the crop and the frame slots)."""
    for kind in (lambda e: e.video is None, lambda e: e.video is not None):
        chosen = [e for e in examples if kind(e)]
        for start in range(0, len(chosen), size):
            yield chosen[start:start + size]
