"""`molmo2-jax eval-synthetic --run runs/tiny --data data/synthetic [--limit 200] [--out results.json]`: evaluate
a trained run on the held-out synthetic grounding split, next to the untrained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "evaluate a trained run on the held-out synthetic grounding split, next to the untrained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory (its latest step is used)")
    parser.add_argument("--data", required=True, help="synthetic dataset directory (molmo2-jax build-synthetic)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--out", help="write metrics and answers as JSON here")


def run(args: argparse.Namespace) -> int:
    import molmo2_jax
    from molmo2_jax.api import Molmo2Model
    from molmo2_jax.data.tfds_builder import data_source, dataset_dir
    from molmo2_jax.evaluation import evaluate, format_table
    from molmo2_jax.params import init_params
    from molmo2_jax.preprocessing import Molmo2Processor

    trained = molmo2_jax.load(args.run)
    processor = Molmo2Processor.from_pretrained(Path(args.data) / "tokenizer")
    source = data_source(dataset_dir(args.data), args.split)
    records = [source[i] for i in range(min(len(source), args.limit or len(source)))]
    untrained = Molmo2Model(trained.config, init_params(trained.config, seed=0))
    results = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        print(f"evaluating the {name} model on {len(records)} {args.split} examples", flush=True)
        results[name] = evaluate(model, processor, records, max_new_tokens=args.max_new_tokens, log=print)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0
