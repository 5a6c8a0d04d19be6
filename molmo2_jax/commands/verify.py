"""`molmo2-jax verify --hf HF_DIR --jax OUR_DIR [--dtype bfloat16] [--max-abs-diff X] [--kl X] [--top1 X]`:
compare our implementation with the transformers reference on fixed text, image, two-image and video inputs.

Prints max |logit difference|, KL divergence and top-1 agreement per input; exits 1 past the thresholds and 2 on
an error (a bad checkpoint), so a failed comparison is told apart from one that could not run."""

from __future__ import annotations

import argparse
import dataclasses
import sys

HELP = ("compare our implementation with the transformers reference (logits diff, KL, top-1 per input); exit 1 "
        "past the thresholds")
ERROR_EXIT_CODE = 2  # 1 means the comparison ran and failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from molmo2_jax.verify import CASES, THRESHOLDS

    parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (the reference)")
    parser.add_argument("--jax", required=True, help="our checkpoint directory (converted, or the same HF dir)")
    parser.add_argument("--dtype", default="float32", choices=sorted(THRESHOLDS), help="dtype of both models")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help=f"inputs to run (default: {' '.join(CASES)})")
    parser.add_argument("--max-abs-diff", type=float, help="max |logit difference| allowed (float32 default 2e-3)")
    parser.add_argument("--kl", type=float, help="mean KL(reference || ours) allowed")
    parser.add_argument("--top1", type=float, help="minimum top-1 agreement")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.verify import THRESHOLDS, report, verify

    given = {"max_abs_diff": args.max_abs_diff, "kl": args.kl, "top1": args.top1}
    limits = dataclasses.replace(THRESHOLDS[args.dtype], **{k: v for k, v in given.items() if v is not None})
    results = verify(args.hf, args.jax, dtype=args.dtype, cases=tuple(args.cases),
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    table, ok = report(results, limits)
    print(table)
    print("PASS" if ok else "FAIL: differences past the thresholds")
    return 0 if ok else 1
