"""`molmo2-jax score --task T --data D --predictions P [--media M] [--out metrics.json]`: score a
predictions file from any system with the official Molmo2 grounding metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from molmo2_jax.errors import Molmo2Error

HELP = "score a predictions file (JSONL of {id, prediction}) against a released eval set with the official metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help="pointing, point_bench, count, video_count, video_pointing or tracking")
    parser.add_argument("--data", required=True,
                        help="the eval set: .parquet / .json / .jsonl file or a directory of them")
    parser.add_argument("--predictions", required=True, help='JSONL, one {"id": ..., "prediction": "<text>"} per line')
    parser.add_argument("--media", help="directory of the images / masks (point_bench; pointing to check mask sizes)")
    parser.add_argument("--sampling-fps", type=int, default=1, help="tracking: frames scored per second (official: 1)")
    parser.add_argument("--out", help="also write the metrics to this JSON file")


def write_json_atomically(path: str | Path, value) -> None:
    """Write JSON to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.evaluation import metrics
    from molmo2_jax.evaluation.datasets import read_examples
    from molmo2_jax.evaluation.predictions import read_predictions

    if args.task not in metrics.TASKS:
        raise Molmo2Error(f"unknown task {args.task!r}; choose one of {', '.join(metrics.TASKS)}")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise Molmo2Error(f"--out {args.out}: directory {Path(args.out).resolve().parent} does not exist")
    predictions = read_predictions(args.predictions)
    examples, skipped = read_examples(args.task, args.data, args.media, sampling_fps=args.sampling_fps,
                                      log=lambda line: print(line, file=sys.stderr))
    ids = {e.id for e in examples}
    without_prediction = sum(e.id not in predictions for e in examples)
    unknown = sum(i not in ids for i in predictions)
    if without_prediction or unknown:
        print(f"{without_prediction} examples have no prediction (scored as empty answers); "
              f"{unknown} predictions name no example of the data", file=sys.stderr)
    result = metrics.score(args.task, [e.truth for e in examples], [predictions.get(e.id, "") for e in examples])
    result.update(examples=len(examples), skipped_rows=len(skipped),
                  data_without_prediction=without_prediction, predictions_without_data=unknown)
    if args.out:
        write_json_atomically(args.out, result)
    print(json.dumps(result))
    return 0
