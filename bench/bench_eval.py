"""`molmo2-jax eval` against a loop of transformers `generate` on the same examples, in one run.

    python bench/bench_eval.py [--examples 8] [--new-tokens 16]

A tiny random Qwen3-style checkpoint (tests/ref_model.tiny_config) and a pixmo-points-eval-schema set of
random 320x240 images: our `eval` command (processor + jitted generation, batch 1, including its compile
and checkpoint load) and the reference Molmo2Processor + Molmo2ForConditionalGeneration.generate loop,
both greedy. Prints examples/s of each, their ratio and whether the answers agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    import numpy as np
    from ref_model import random_image, tokenizer_checkpoint
    from test_cli_eval import transformers_answers

    from molmo2_jax.cli import main as cli

    work = Path(tempfile.mkdtemp())
    model = tokenizer_checkpoint(work / "ckpt")

    mask = np.zeros((240, 320), dtype=bool).tolist()
    rows = [{"points": [{"x": 50.0, "y": 50.0}], "masks": [mask], "label": "thing", "image": f"{n}.png"}
            for n in range(args.examples)]
    for n in range(args.examples):
        random_image(320, 240, n).save(work / f"{n}.png")
    (work / "test.json").write_text(json.dumps(rows))

    start = time.perf_counter()
    cli(["eval", "--checkpoint", str(work / "ckpt"), "--task", "pointing", "--data", str(work / "test.json"),
         "--media", str(work), "--out", str(work / "out"), "--max-new-tokens", str(args.new_tokens)])
    ours_seconds = time.perf_counter() - start
    ours = [json.loads(x)["prediction"] for x in (work / "out" / "predictions.jsonl").read_text().splitlines()]

    start = time.perf_counter()
    theirs = transformers_answers((work / "ckpt", model), rows, work, args.new_tokens)
    theirs_seconds = time.perf_counter() - start

    n = args.examples
    print(f"ours (eval, incl. load + compile): {n / ours_seconds:.2f} examples/s ({ours_seconds:.1f} s)")
    print(f"transformers generate loop:         {n / theirs_seconds:.2f} examples/s ({theirs_seconds:.1f} s)")
    print(f"ratio ours/transformers: {theirs_seconds / ours_seconds:.2f}x; "
          f"answers agree on {sum(a == b for a, b in zip(ours, theirs))}/{n}")


if __name__ == "__main__":
    main()
