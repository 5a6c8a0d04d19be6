"""`molmo2-jax eval-synthetic --run runs/tiny --data data/synthetic [--steps 0 400 800] [--limit N]`: answer
the held-out synthetic pointing, counting, video counting and tracking examples with the untrained model
(step 0) and saved steps of a training run, and score them with the official metrics as `molmo2-jax eval`
does. Writes to --out (default RUN/eval):

    metrics.json           {"steps": {step: {task: metrics}}, "examples": {task: count}}
    predictions/STEP.jsonl the answers ({"id", "prediction"}; `molmo2-jax score --data DATA` reads them)
    metrics.png            the metrics over the training steps
    examples.png           held-out images, true objects outlined, the untrained and the last step's points
    track.gif              a held-out tracking clip with the last step's tracks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from molmo2_jax.errors import Molmo2Error

HELP = "score the untrained model and saved steps of a run on the held-out synthetic set; plot and draw them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--data", required=True, help="synthetic dataset directory (molmo2-jax build-synthetic)")
    parser.add_argument("--steps", type=int, nargs="+",
                        help="steps to evaluate, 0 for the untrained model (default: 0 and every saved step)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out records")
    parser.add_argument("--batch-size", type=int, default=8, help="questions answered by one generate call")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--draw", type=int, default=6, help="held-out images drawn into examples.png")
    parser.add_argument("--seed", type=int, default=0, help="init seed of the untrained model (the run's init.seed)")
    parser.add_argument("--out", help="output directory (default: RUN/eval)")


def format_table(history: dict[int, dict[str, dict]], first: int, last: int) -> str:
    """A Markdown table of the headline metrics of two steps."""
    rows = [("pointing precision (points in masks)", "pointing", "precision"),
            ("pointing recall", "pointing", "recall"),
            ("pointing F1", "pointing", "f1"), ("counting correct (number of points)", "count", "correct"),
            ("video counting correct (stated count)", "video_count", "correct"),
            ("tracking F1 (per frame)", "tracking", "f1"), ("tracking HOTA", "tracking", "hota")]
    name = lambda s: "untrained" if s == 0 else f"step {s}"
    lines = [f"| metric | {name(first)} | {name(last)} |", "|---|---|---|"]
    for label, task, key in rows:
        cells = [history[s].get(task, {}).get(key) for s in (first, last)]
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{100 * v:.1f}%" for v in cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import molmo2_jax
    from molmo2_jax.checkpoint.formats import training_steps
    from molmo2_jax.commands.score import write_json_atomically
    from molmo2_jax.evaluation import metrics, report, synthetic
    from molmo2_jax.evaluation.answering import answer, batches
    from molmo2_jax.params import init_params
    from molmo2_jax.preprocessing import Molmo2Processor

    run_dir, out = Path(args.run), Path(args.out or Path(args.run) / "eval")
    step_dirs = training_steps(run_dir)
    saved = sorted(step_dirs)
    if not saved:
        raise Molmo2Error(f"--run {run_dir}: no saved training step in {run_dir / 'checkpoints'}")
    steps = sorted(set(args.steps if args.steps else [0, *saved]))
    missing = [s for s in steps if s and s not in saved]
    if missing:
        raise Molmo2Error(f"--run {run_dir} has no saved step {missing} (saved: {saved})")
    if not synthetic.is_synthetic(args.data):
        raise Molmo2Error(f"--data {args.data}: not a synthetic set (molmo2-jax build-synthetic --out DIR)")
    if args.batch_size < 1:
        raise Molmo2Error(f"--batch-size must be at least 1, got {args.batch_size}")
    by_task = synthetic.read_examples(args.data, limit=args.limit)
    examples = [e for task in by_task.values() for e in task]
    processor = Molmo2Processor.from_pretrained(Path(args.data) / "tokenizer")
    # One model object for every step: its compiled programs take the params as an argument, so swapping
    # them reuses the compilation.
    model = molmo2_jax.load(step_dirs[saved[-1]])
    untrained = init_params(model.config, seed=args.seed) if 0 in steps else None
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    history, answers = {}, {}
    counts = {task: len(e) for task, e in by_task.items()}
    for step in steps:
        model.params = untrained if step == 0 else molmo2_jax.load(step_dirs[step]).params
        start, texts = time.perf_counter(), {}
        for batch in batches(examples, args.batch_size):
            ids = [e.id for e in batch]
            texts.update(zip(ids, answer(model, processor, batch, max_new_tokens=args.max_new_tokens)))
        (out / "predictions" / f"{step}.jsonl").write_text(
            "".join(json.dumps({"id": e.id, "prediction": texts[e.id]}) + "\n" for e in examples))
        history[step] = {task: metrics.score(task, [e.truth for e in chosen], [texts[e.id] for e in chosen])
                         for task, chosen in by_task.items() if chosen}
        answers[step] = texts
        print(f"step {step}: {len(examples)} held-out examples answered in {time.perf_counter() - start:.0f} s "
              f"({', '.join(f'{n} {t}' for t, n in counts.items())})", flush=True)
    write_json_atomically(out / "metrics.json", {"steps": history, "examples": counts})
    first, last = steps[0], steps[-1]
    name = lambda s: "untrained" if s == 0 else f"step {s}"
    written = [out / "metrics.json", out / "predictions",
               report.plot_metrics(history, out / "metrics.png",
                                   f"held-out synthetic examples ({len(examples)}), official metrics")]
    drawn = by_task["pointing"][:(args.draw + 1) // 2] + by_task["count"][:args.draw // 2]
    if drawn:
        written.append(report.draw_examples(drawn, {name(s): answers[s] for s in dict.fromkeys((first, last))},
                                            out / "examples.png"))
    if by_task["tracking"]:
        example = by_task["tracking"][0]
        written.append(report.draw_track(example, answers[last][example.id], out / "track.gif"))
    print(format_table(history, first, last))
    print("written:\n" + "\n".join(f"  {p}" for p in written))
    return 0
