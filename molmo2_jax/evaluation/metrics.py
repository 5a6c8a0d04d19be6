"""The official Molmo2 grounding metrics (allenai/molmo2 `olmo/eval/evaluators.py` and
`object_tracking_utils.py`), reimplemented to give the same numbers on the same answers.

Each `score_*` function takes the examples' truths and the raw answers (same order) and returns the
metric dict: fractions in [0, 1], None where a group has no example. Per-example scores are averaged
over examples, as the official evaluators do.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from . import answers
from .masks import decode_rle, point_in_mask

POINT_BENCH_CATEGORIES = ("affordable", "counting", "reasoning", "spatial", "steerable")
VIDEO_COUNT_CATEGORIES = ("object", "animal", "action/event")
VIDEO_COUNT_BINS = (0, 5, 10, 15, 20, 25)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def f1_score(precision: float, recall: float) -> float:
    # the official epsilon in the denominator is kept: it moves F1 in the 10th decimal
    return 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall + 1e-10)


def _matched_hits(predicted: np.ndarray, truth: np.ndarray, hit) -> int:
    """Hungarian matching of predictions to truths on L2 distance; the number of matched pairs
    `hit(prediction index, truth index)` accepts."""
    rows, cols = linear_sum_assignment(cdist(predicted, truth))
    return sum(bool(hit(i, j)) for i, j in zip(rows, cols))


# ------------------------------------------------------------------------------------------------
# Image pointing (PointingEval), PointBench, image counting (PointCountEval)


@dataclass
class PointingTruth:
    """pixmo-points-eval: the objects' points in pixels and one mask [H, W] per point."""

    points: np.ndarray  # [n, 2] pixel (x, y)
    masks: np.ndarray  # [n, H, W] bool
    image_size: tuple[int, int]  # (width, height)


def pointing_example(truth: PointingTruth, answer: str) -> tuple[float, float, float]:
    predicted = answers.image_points(answer, *truth.image_size)
    if len(truth.points) == 0:
        score = float(not predicted)
        return score, score, score
    if not predicted:
        return 0.0, 0.0, 0.0
    predicted = np.asarray(predicted, dtype=float)
    hits = _matched_hits(predicted, truth.points, lambda i, j: point_in_mask(predicted[i], truth.masks[j]))
    precision, recall = hits / len(predicted), hits / len(truth.masks)
    return precision, recall, f1_score(precision, recall)


def score_pointing(truths: Sequence[PointingTruth], texts: Sequence[str]) -> dict[str, Any]:
    scores = np.array([pointing_example(t, a) for t, a in zip(truths, texts)]).reshape(-1, 3)
    return {k: _mean(scores[:, i]) for i, k in enumerate(("precision", "recall", "f1"))}


@dataclass
class PointBenchTruth:
    mask: np.ndarray  # [H, W] bool
    image_size: tuple[int, int]
    category: str


def point_bench_example(truth: PointBenchTruth, answer: str) -> bool:
    """Correct when there is a point and every point is in the mask. PointBench truncates the
    coordinates (int) where the other tasks round them."""
    width, height = truth.image_size
    points = answers.image_points(answer, width, height)
    return bool(points) and all(
        0 <= int(x) < min(width, truth.mask.shape[1]) and 0 <= int(y) < min(height, truth.mask.shape[0])
        and truth.mask[int(y), int(x)] for x, y in points)


def score_point_bench(truths: Sequence[PointBenchTruth], texts: Sequence[str]) -> dict[str, Any]:
    by_category = defaultdict(list)
    for truth, text in zip(truths, texts):
        by_category[truth.category].append(point_bench_example(truth, text))
    per_category = {c: _mean(by_category[c]) for c in POINT_BENCH_CATEGORIES}
    present = [v for v in per_category.values() if v is not None]
    # the headline is the mean of the five category accuracies (the official run reports only those)
    return {"accuracy": _mean(present), **per_category}


def score_count(counts: Sequence[int], texts: Sequence[str]) -> dict[str, Any]:
    """CountBench / PixMo-Count: the number of points in the answer against the true count."""
    correct, close = [], []
    per_count = defaultdict(list)
    for gt, text in zip(counts, texts):
        n = answers.point_count(text)
        correct.append(n == gt)
        close.append(abs(n - gt) <= 1)
        per_count[int(gt)].append(n == gt)
    return {"correct": _mean(correct), "close": _mean(close), "valid": 1.0 if counts else None,
            **{f"correct_{k}": _mean(per_count[k]) for k in sorted(per_count)}}


# ------------------------------------------------------------------------------------------------
# Video counting (VixMoPointCountEval)


def score_video_count(counts: Sequence[int], categories: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """The stated count; close within 1 + floor(5% of the truth); accuracy per category and per bin
    of true counts [0, 5), [5, 10), ... [25, largest + 1)."""
    correct, close, valid = [], [], []
    per_count, per_category = defaultdict(list), defaultdict(list)
    for gt, category, text in zip(counts, categories, texts):
        n = answers.stated_count(text)
        ok = n is not None and n == gt
        correct.append(ok)
        close.append(n is not None and abs(n - gt) <= 1 + math.floor(0.05 * gt))
        valid.append(n is not None)
        per_count[int(gt)].append(ok)
        per_category[category].append(ok)
    out = {"correct": _mean(correct), "close": _mean(close), "valid": _mean(valid)}
    largest = max(per_count, default=0)
    for lower, upper in zip(VIDEO_COUNT_BINS, VIDEO_COUNT_BINS[1:] + (largest + 1,)):
        out[f"correct_{lower}_{upper}"] = _mean([s for k in range(lower, upper) for s in per_count.get(k, [])])
    for category in VIDEO_COUNT_CATEGORIES:
        out[f"acc_{category}"] = _mean(per_category[category])
    return out


# ------------------------------------------------------------------------------------------------
# Video pointing (VixMoPointEval)


@dataclass
class VideoPointTruth:
    """Molmo2-VideoPointEval: one (t, x, y) per annotated point and its mask per timestamp."""

    points: list[tuple[float, float, float]]  # (seconds, x px, y px)
    tubelets: list[dict[float, Any]]  # per point: {seconds: RLE or [H, W] mask}
    width: int
    height: int
    duration: float


def _normalized(triplets, truth: VideoPointTruth) -> np.ndarray:
    """(t, x, y) on 0..100 scales of the duration and frame, one decimal, for matching."""
    return np.array([(round(t / truth.duration * 100, 1), round(x / truth.width * 100, 1),
                      round(y / truth.height * 100, 1)) for t, x, y in triplets])


def video_pointing_example(truth: VideoPointTruth, answer: str) -> tuple[float, float, float]:
    predicted = answers.video_points(answer, truth.width, truth.height)
    if not truth.points:
        score = float(not predicted)
        return score, score, score
    if not predicted:
        return 0.0, 0.0, 0.0

    def hit(i: int, j: int) -> bool:
        t, x, y = predicted[i]
        # a prediction must name an annotated timestamp exactly; one between frames is a miss
        mask = truth.tubelets[j].get(t)
        return mask is not None and point_in_mask((x, y), decode_rle(mask))

    hits = _matched_hits(_normalized(predicted, truth), _normalized(truth.points, truth), hit)
    precision, recall = hits / len(predicted), hits / len(truth.tubelets)
    return precision, recall, f1_score(precision, recall)


def score_video_pointing(truths: Sequence[VideoPointTruth], texts: Sequence[str]) -> dict[str, Any]:
    scores = np.array([video_pointing_example(t, a) for t, a in zip(truths, texts)]).reshape(-1, 3)
    valid = [bool(answers.video_points(a, t.width, t.height)) for t, a in zip(truths, texts)]
    return {**{k: _mean(scores[:, i]) for i, k in enumerate(("precision", "recall", "f1"))},
            "valid": _mean(valid)}


# ------------------------------------------------------------------------------------------------
# Tracking (VideoObjectTrackingEval)


@dataclass
class TrackTruth:
    """Molmo2-VideoTrackEval: the sampled frames' points and every object's masks.

    `frames` lists (frame index, {object index: (x, y)}) in frame order; `masks` maps each object (in
    the row's order) to its per-frame RLE masks (None where unannotated).
    """

    frames: list[tuple[int, dict[int, tuple[float, float]]]]
    masks: dict[Any, list[Any]]
    width: int
    height: int
    fps: float
    category: str | None = None
    _decoded: dict = field(default_factory=dict, repr=False)

    def masks_at(self, frame: int) -> list[np.ndarray]:
        """Every object's mask at `frame` (an empty mask where it has none), in `masks` order."""
        if frame not in self._decoded:
            empty = np.zeros((self.height, self.width), dtype=bool)
            self._decoded[frame] = [
                decode_rle(per_frame[frame]).astype(bool)
                if frame < len(per_frame) and per_frame[frame] is not None else empty
                for per_frame in self.masks.values()]
        return self._decoded[frame]


def _frame_scores(truth: TrackTruth, frame: int, predicted: list, gt: list) -> tuple[float, float, float]:
    if not gt:
        score = float(not predicted)
        return score, score, score
    if not predicted:
        return 0.0, 0.0, 0.0
    masks = truth.masks_at(frame)
    # As officially: the j-th point of the frame is checked against the j-th object's mask, and
    # recall divides by the number of objects in the video, not of those in this frame.
    hits = _matched_hits(np.array(predicted), np.array(gt), lambda i, j: point_in_mask(predicted[i], masks[j]))
    precision, recall = hits / len(predicted), (hits / len(masks) if masks else 1.0)
    return precision, recall, f1_score(precision, recall)


def _hota(truth: TrackTruth, predicted: dict[int, dict], gt: dict[int, dict]) -> dict[str, float]:
    """HOTA, DetA and AssA with point-in-mask similarity (0 or 1, so every alpha gives the same),
    computed by TrackEval's HOTA; with neither truth nor prediction the official scorer gives 1."""
    from trackeval.metrics import HOTA

    gt_ids = {k: n for n, k in enumerate(sorted({k for p in gt.values() for k in p}))}
    pred_ids = {k: n for n, k in enumerate(sorted({k for p in predicted.values() for k in p}))}
    data = {"num_gt_ids": len(gt_ids), "num_tracker_ids": len(pred_ids), "gt_ids": [], "tracker_ids": [],
            "similarity_scores": [], "num_gt_dets": 0, "num_tracker_dets": 0}
    for frame in sorted(set(predicted) | set(gt)):
        g = sorted(gt.get(frame, {}).items())
        p = sorted(predicted.get(frame, {}).items())  # html ids are strings: "10" sorts before "2", as officially
        similarity = np.zeros((len(g), len(p)))
        if g and p:
            for i, mask in enumerate(truth.masks_at(frame)[:len(g)]):  # j-th point, j-th mask, as above
                for j, (_, xy) in enumerate(p):
                    similarity[i, j] = point_in_mask(xy, mask)
        data["gt_ids"].append(np.array([gt_ids[k] for k, _ in g], dtype=int))
        data["tracker_ids"].append(np.array([pred_ids[k] for k, _ in p], dtype=int))
        data["similarity_scores"].append(similarity)
        data["num_gt_dets"] += len(g)
        data["num_tracker_dets"] += len(p)
    if data["num_gt_dets"] == 0 and data["num_tracker_dets"] == 0:
        return {"hota": 1.0, "deta": 1.0, "assa": 1.0}
    res = HOTA().eval_sequence(data)
    return {"hota": float(res["HOTA"][9]), "deta": float(res["DetA"][9]), "assa": float(res["AssA"][9])}


def tracking_example(truth: TrackTruth, answer: str) -> dict[str, float]:
    """Per-frame precision / recall / F1 averaged over the frames with a truth or a prediction, and
    HOTA / DetA / AssA over the video."""
    # a repeated frame: the later wins
    predicted = dict(answers.track_frames(answer, truth.width, truth.height, truth.fps))
    gt = dict(truth.frames)
    frames = sorted(set(predicted) | set(gt))
    if frames:
        per_frame = np.array([_frame_scores(truth, f, list(predicted.get(f, {}).values()),
                                            list(gt.get(f, {}).values())) for f in frames])
        prf = dict(zip(("precision", "recall", "f1"), per_frame.mean(0).tolist()))
    else:
        prf = {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {**prf, **_hota(truth, predicted, gt)}


def score_tracking(truths: Sequence[TrackTruth], texts: Sequence[str]) -> dict[str, Any]:
    per_example = [tracking_example(t, a) for t, a in zip(truths, texts)]
    keys = ("precision", "recall", "f1", "hota", "deta", "assa")
    out = {k: _mean([e[k] for e in per_example]) for k in keys}
    for category in sorted({t.category for t in truths if t.category is not None}):
        chosen = [e for t, e in zip(truths, per_example) if t.category == category]
        out.update({f"{k}_{category}": _mean([e[k] for e in chosen]) for k in keys})
    return out


TASKS = ("pointing", "point_bench", "count", "video_count", "video_pointing", "tracking")


def score(task: str, truths: Sequence[Any], texts: Sequence[str]) -> dict[str, Any]:
    """The metrics of `task` (one of TASKS) for truths as `datasets.read_examples` gives them."""
    if task == "video_count":
        return score_video_count([c for c, _ in truths], [k for _, k in truths], texts)
    return {"pointing": score_pointing, "point_bench": score_point_bench, "count": score_count,
            "video_pointing": score_video_pointing, "tracking": score_tracking}[task](truths, texts)
