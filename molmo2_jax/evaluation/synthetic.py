"""Grounding evaluation on held-out synthetic examples: generate an answer for each question and score
pointing, counting and tracking against the ground truth.

- pointing accuracy: the share of predicted points (point task) that lie within `tolerance` x the image
  diagonal of a true object, each object matched at most once; recall and the share of examples with every
  object found and no extra point are reported beside it;
- counting exact match: the stated count equals the true count (image and video counting);
- tracking accuracy: the share of track examples whose every track stays within the tolerance in every frame.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from molmo2_jax.data.synthetic import score
from molmo2_jax.grounding import parse


def answer(model, processor, record: dict[str, Any], max_new_tokens: int) -> str:
    """The model's greedy answer to the question of one synthetic record."""
    from molmo2_jax.preprocessing import load_image

    question = json.loads(record["messages"])[0]["content"]
    images = [load_image(bytes(png)) for png in record["images"]]
    video = bytes(record["video"]) or None
    content = [{"type": "image"} for _ in images] + [{"type": "video"}] * bool(video) + [
        {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = processor(prompt, images=images or None, videos=[video] if video else None)
    result = model.generate(inputs, max_new_tokens=max_new_tokens, tokenizer=processor.tokenizer)
    return result.texts[0]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def point_matches(answer_text: str, truth: dict[str, Any], tolerance: float = 0.05) -> tuple[int, int, int]:
    """(matched, predicted, true) points of a point answer; nearest pairs are matched first."""
    width, height = truth["size"]
    limit = tolerance * math.hypot(width, height)
    found = parse(answer_text, image_sizes=[(width, height)])
    predicted = [(p.x, p.y) for g in found for p in g.points]
    targets = [o["track"][0] for o in truth["objects"] if f"{o['color']} {o['shape']}s" == truth["label"]]
    pairs = sorted((math.dist(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(targets))
    used_p, used_t = set(), set()
    for distance, i, j in pairs:
        if distance <= limit and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p), len(predicted), len(targets)


def evaluate(model, processor, records: Iterable[dict[str, Any]], *, max_new_tokens: int = 160,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Metrics over `records` (decoded synthetic dataset records) and the per-example answers."""
    matched = predicted = true = 0
    exact_points, counts, tracks, examples = [], [], [], []
    start = time.perf_counter()
    for n, record in enumerate(records, 1):
        task, truth = _text(record["task"]), json.loads(record["truth"])
        text = answer(model, processor, record, max_new_tokens)
        graded = score(task, text, truth)
        if task == "point":
            m, p, t = point_matches(text, truth)
            matched, predicted, true = matched + m, predicted + p, true + t
            exact_points.append(graded["points_correct"])
        if "count_exact" in graded:
            counts.append(graded["count_exact"])
        if task == "track":
            tracks.append(graded["points_correct"])
        examples.append({"id": _text(record["id"]), "task": task, "answer": text, **graded})
        if log and n % 25 == 0:
            log(f"  {n} examples answered ({n / (time.perf_counter() - start):.1f}/s)")
    share = lambda xs: float(np.mean(xs)) if xs else float("nan")
    return {
        "pointing_accuracy": matched / predicted if predicted else 0.0,
        "pointing_recall": matched / true if true else float("nan"),
        "pointing_exact": share(exact_points),
        "counting_exact_match": share(counts),
        "tracking_accuracy": share(tracks),
        "examples": {"point": len(exact_points), "count": len(counts), "track": len(tracks)},
        "answers": examples,
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one column per evaluated model."""
    rows = [("pointing accuracy (point precision)", "pointing_accuracy"), ("pointing recall", "pointing_recall"),
            ("pointing, every object exact (incl. 'none' answers)", "pointing_exact"),
            ("counting exact match", "counting_exact_match"),
            ("tracking accuracy", "tracking_accuracy")]
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * results[n][key]:.1f}%" for n in names) + " |")
    counts = next(iter(results.values()))["examples"]
    lines.append(f"\n({counts['point']} pointing, {counts['count']} counting, {counts['track']} tracking examples)")
    return "\n".join(lines)
