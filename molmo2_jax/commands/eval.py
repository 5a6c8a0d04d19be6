"""`molmo2-jax eval --checkpoint C --task T --data D [--media M] --out DIR`: greedy answers of a checkpoint
over a released eval set, written to DIR/predictions.jsonl as they come (a rerun skips the ids already
there), then scored with the official metrics into DIR/metrics.json.

With several processes (`jax.distributed`), process k answers examples k, k + n, k + 2n, ... into
DIR/predictions.k.jsonl; when all are done, process 0 merges them (in data order) into
DIR/predictions.jsonl and scores."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from molmo2_jax.errors import Molmo2Error
from molmo2_jax.evaluation import answering

HELP = "answer a released eval set with a checkpoint (resumable) and score it with the official metrics"

# The official evaluation's settings (the allenai/molmo2 README): at least 24 crops for images; videos at
# the processor's rate (2 fps) except tracking, scored at 1 fps.
MAX_CROPS = 24
VIDEO_FPS = {"tracking": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory with its tokenizer and processor files")
    parser.add_argument("--task", required=True,
                        help="pointing, point_bench, count, video_count, video_pointing or tracking")
    parser.add_argument("--data", required=True,
                        help="the eval set: .parquet / .json / .jsonl file or a directory of them")
    parser.add_argument("--media", help="directory of its images / videos")
    parser.add_argument("--out", required=True, help="output directory (predictions.jsonl, metrics.json)")
    parser.add_argument("--max-new-tokens", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8, help="questions answered by one generate call")
    parser.add_argument("--mesh", help="shard the model and each batch over this process's devices, e.g. data=4 "
                                       "or fsdp=2,tensor=2 (default: one device)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 of a multi-host run")
    parser.add_argument("--num-processes", type=int, help="processes of a multi-host run")
    parser.add_argument("--process-id", type=int, help="this process's index in 0..num-processes-1")


def read_done(path: Path) -> dict[str, str]:
    """Predictions already written. A last line cut off by a kill is dropped from the file; any other
    bad line is an error naming it."""
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # cut off mid-write
        with path.open("r+") as f:
            f.truncate(len(text) - len(lines[-1]))
        lines = lines[:-1]
    done = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            done[str(record["id"])] = record["prediction"]
        except (ValueError, KeyError, TypeError):
            raise Molmo2Error(f"{path}:{number}: not a prediction line; fix or remove it to resume") from None
    return done


class Progress:
    """A one-line progress bar with examples/s on stderr."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.new, self.start = total, done, 0, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done, self.new = self.done + n, self.new + n
        rate = self.new / (time.perf_counter() - self.start)
        filled = int(30 * self.done / max(self.total, 1))
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {rate:.2f} examples/s",
              end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import jax

    import molmo2_jax
    from molmo2_jax import distributed
    from molmo2_jax.commands.score import write_json_atomically
    from molmo2_jax.evaluation import metrics
    from molmo2_jax.evaluation.datasets import read_examples
    from molmo2_jax.preprocessing import Molmo2Processor
    from molmo2_jax.sharding import make_mesh

    if args.task not in metrics.TASKS:
        raise Molmo2Error(f"unknown task {args.task!r}; choose one of {', '.join(metrics.TASKS)}")
    if args.batch_size < 1:
        raise Molmo2Error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.checkpoint).is_dir():
        raise Molmo2Error(f"--checkpoint {args.checkpoint}: directory not found")
    examples, skipped = read_examples(args.task, args.data, args.media, log=lambda line: print(line, file=sys.stderr))
    examples = examples[:args.limit]
    unanswerable = [e.id for e in examples if not (e.image or e.video)]
    if unanswerable:
        raise Molmo2Error(f"{len(unanswerable)} examples have no image or video in --media {args.media} "
                          f"(first: id {unanswerable[0]})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    rank, processes = jax.process_index(), jax.process_count()
    mine = examples[rank::processes]
    path = out / ("predictions.jsonl" if processes == 1 else f"predictions.{rank}.jsonl")
    done = read_done(path)
    todo = [e for e in mine if e.id not in done]
    if todo:
        processor = Molmo2Processor.from_pretrained(args.checkpoint)
        mesh = make_mesh(args.mesh, devices=jax.local_devices()) if args.mesh else None
        model = molmo2_jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
        progress = Progress(len(mine), len(mine) - len(todo))
        with path.open("a") as f:
            for batch in answering.batches(todo, args.batch_size):
                texts = answering.answer(model, processor, batch, max_new_tokens=args.max_new_tokens,
                                         max_crops=MAX_CROPS, video_fps=VIDEO_FPS.get(args.task),
                                         batch_size=args.batch_size)
                f.write("".join(json.dumps({"id": e.id, "prediction": t}) + "\n" for e, t in zip(batch, texts)))
                f.flush()  # a kill loses at most the batch being answered
                done.update((e.id, t) for e, t in zip(batch, texts))
                progress.step(len(batch))
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eval predictions written")
        if rank != 0:
            return 0
        for k in range(processes):
            done.update(read_done(out / f"predictions.{k}.jsonl"))
        merged = "".join(json.dumps({"id": e.id, "prediction": done[e.id]}) + "\n" for e in examples)
        tmp = out / ".predictions.jsonl.tmp"
        tmp.write_text(merged)
        tmp.replace(out / "predictions.jsonl")
    result = metrics.score(args.task, [e.truth for e in examples], [done[e.id] for e in examples])
    result.update(examples=len(examples), skipped_rows=len(skipped))
    write_json_atomically(out / "metrics.json", result)
    print(json.dumps(result))
    return 0
