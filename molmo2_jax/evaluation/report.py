"""What a person looks at after the main job: the held-out metrics over training steps as a plot, and
held-out images with the points two models predicted drawn on them (a tracking clip as a GIF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from molmo2_jax.grounding import draw_points, draw_tracks, parse
from molmo2_jax.grounding.draw import write_atomic

from .datasets import Example

# (task, metric, legend) of each plotted line
PLOTTED = (("pointing", "f1", "pointing F1 (points in masks)"), ("pointing", "precision", "pointing precision"),
           ("pointing", "recall", "pointing recall"), ("count", "correct", "counting (points) correct"),
           ("video_count", "correct", "video counting correct"), ("tracking", "f1", "tracking F1"),
           ("tracking", "hota", "tracking HOTA"))


def plot_metrics(history: Mapping[int, Mapping[str, Mapping[str, Any]]], path: str | Path, title: str) -> Path:
    """A PNG of each `PLOTTED` metric (in %) against the training step; `history` maps step -> task -> metrics."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    steps = sorted(history)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for task, key, label in PLOTTED:
        values = [history[s].get(task, {}).get(key) for s in steps]
        if any(v is not None for v in values):
            dashed = task == "pointing" and key != "f1"
            ax.plot(steps, [np.nan if v is None else 100 * v for v in values], marker="o",
                    linestyle="--" if dashed else "-", linewidth=1 if dashed else 2, label=label)
    ax.set(xlabel="training step (0: untrained)", ylabel="%", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _outline(image: Image.Image, masks: np.ndarray) -> Image.Image:
    """The image with each true object's mask border drawn in the colour that stands out on its background."""
    arr = np.array(image)
    for mask in masks:
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        arr[mask & ~inner] = (0, 220, 255)
    return Image.fromarray(arr)


def draw_examples(examples: Sequence[Example], answers: Mapping[str, Mapping[str, str]], path: str | Path) -> Path:
    """One PNG: a row per image example (at least one; pointing or counting) and a column per model (`answers`
    maps a model name to id -> answer): the image with the true objects (pointing) outlined in cyan and the
    model's points drawn."""
    from molmo2_jax.preprocessing import load_image

    names = list(answers)
    tiles = []
    for e in examples:
        image = Image.fromarray(load_image(e.image if isinstance(e.image, bytes) else str(e.image)))
        base = _outline(image, e.truth.masks) if hasattr(e.truth, "masks") else image
        tiles.append([draw_points(base, parse(answers[n][e.id], image_sizes=[image.size])) for n in names])
    width, height = tiles[0][0].size
    font = ImageFont.load_default(size=12)
    head, caption, gap = 18, 16, 6
    canvas = Image.new("RGB", (len(names) * (width + gap) + gap, head + len(tiles) * (height + caption + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(names):
        draw.text((gap + col * (width + gap), 2), name, fill=(0, 0, 0), font=font)
    for row, (e, images) in enumerate(zip(examples, tiles)):
        top = head + row * (height + caption + gap)
        draw.text((gap, top), e.question, fill=(0, 0, 0), font=font)
        for col, tile in enumerate(images):
            canvas.paste(tile, (gap + col * (width + gap), top + caption))
    return write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))


def draw_track(example: Example, answer: str, path: str | Path) -> Path:
    """An animated GIF of a tracking example's video with the tracks of `answer` drawn."""
    from molmo2_jax.preprocessing import decode_video

    video = decode_video(example.video if isinstance(example.video, bytes) else str(example.video))
    height, width = video.frames.shape[1:3]
    return draw_tracks(video.frames, video.timestamps, parse(answer, video_size=(width, height)), path)
