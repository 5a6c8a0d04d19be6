"""The synthetic grounding set's held-out split as evaluation examples for the official metrics, so that it
is answered (`answering`) and scored (`metrics.score`) exactly as the released sets are by `molmo2-jax eval`
and `score` (`datasets.read_examples` reads a synthetic set directory too).

    point        -> pointing     the asked-about objects' centres and masks
    count        -> count        the true count (an answer's count is its number of points)
    video_count  -> video_count  the true count, category "object" (the count is "a total of N"; officially
                                 "There are none." is no number, so a right answer to a zero count scores 0)
    track        -> tracking     each asked-about object's position and mask on every frame the answer names

Captioning and yes/no examples have no official metric and are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .datasets import DatasetError, Example
from .masks import decode_rle

TASKS = {"point": "pointing", "count": "count", "video_count": "video_count", "track": "tracking"}


def is_synthetic(path: str | Path) -> bool:
    """Whether `path` is a directory written by `molmo2-jax build-synthetic` (checked without importing
    TFDS: the dataset sits in its `synthetic_shapes/` directory)."""
    return (Path(path) / "synthetic_shapes").is_dir()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _truth(task: str, truth: dict[str, Any]) -> Any:
    width, height = truth["size"]
    targets = [i for i, o in enumerate(truth["objects"]) if f"{o['color']} {o['shape']}s" == truth["label"]]
    if task == "pointing":
        points = np.array([truth["objects"][i]["track"][0] for i in targets], dtype=float).reshape(-1, 2)
        masks = np.zeros((len(targets), height, width), dtype=bool)
        for n, i in enumerate(targets):
            masks[n] = decode_rle(truth["masks"][i][0])
        return metrics.PointingTruth(points, masks, (width, height))
    if task == "count":
        return truth["count"]
    if task == "video_count":
        return truth["count"], "object"
    # tracking: the scorer puts a point named at time t on frame round(t * fps); the truth there is the
    # object on the frame shown at t (the last time of a clip can be past its last frame)
    fps = truth["fps"]
    at = {round(t * fps): f for t, f in zip(truth["frame_times"], truth["frames"])}
    frames = [(k, {n: tuple(truth["objects"][i]["track"][f]) for n, i in enumerate(targets)})
              for k, f in sorted(at.items())]
    masks = {n: [truth["masks"][i][at[k]] if k in at else None for k in range(max(at) + 1)]
             for n, i in enumerate(targets)}
    return metrics.TrackTruth(frames, masks, width, height, fps)


def example(record: dict[str, Any]) -> tuple[str, Example] | None:
    """(official task, example) of a synthetic dataset record; None for a task without an official metric."""
    task = TASKS.get(_text(record["task"]))
    if task is None:
        return None
    question = json.loads(record["messages"])[0]["content"]
    images = [bytes(png) for png in record["images"]]
    video = bytes(record["video"]) or None
    return task, Example(_text(record["id"]), _truth(task, json.loads(record["truth"])), question,
                         images[0] if images else None, video)


def read_examples(data: str | Path, split: str = "validation", limit: int | None = None) -> dict[str, list[Example]]:
    """The examples of each official task among the first `limit` records (default: all) of a split."""
    from molmo2_jax.data.tfds_builder import data_source, dataset_dir

    source = data_source(dataset_dir(data), split)
    out: dict[str, list[Example]] = {task: [] for task in TASKS.values()}
    for i in range(min(len(source), len(source) if limit is None else limit)):
        record = source[i]
        if "masks" not in json.loads(record["truth"]):
            raise DatasetError(f"{data}: built by an older version without object masks; build it again "
                               "(molmo2-jax build-synthetic --overwrite)")
        found = example(record)
        if found is not None:
            out[found[0]].append(found[1])
    return out
