"""Compare our implementation with the transformers reference on fixed text, image, two-image and video inputs.

    python convert/verify.py --hf HF_DIR --jax CONVERTED_DIR [--dtype bfloat16] [--max-abs-diff X] [--kl X] [--top1 X]

Prints max |logit difference|, KL divergence and top-1 agreement per input; exits 1 past the thresholds.
"""

import argparse
import dataclasses
import sys

from molmo2_jax.checkpoint.verify import CASES, THRESHOLDS, report, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (the reference)")
    parser.add_argument("--jax", required=True, help="our checkpoint directory (converted, or the same HF dir)")
    parser.add_argument("--dtype", default="float32", choices=sorted(THRESHOLDS), help="dtype of both models")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help=f"inputs to run (default: {' '.join(CASES)})")
    parser.add_argument("--max-abs-diff", type=float, help="max |logit difference| allowed (float32 default 2e-3)")
    parser.add_argument("--kl", type=float, help="mean KL(reference || ours) allowed")
    parser.add_argument("--top1", type=float, help="minimum top-1 agreement")
    args = parser.parse_args(argv)
    limits = THRESHOLDS[args.dtype]
    limits = dataclasses.replace(limits, **{k: v for k, v in (("max_abs_diff", args.max_abs_diff), ("kl", args.kl),
                                                               ("top1", args.top1)) if v is not None})
    try:
        results = verify(args.hf, args.jax, dtype=args.dtype, cases=tuple(args.cases),
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:  # our errors derive from ValueError; file problems are OSError
        print(f"verify.py: error: {e}", file=sys.stderr)
        return 2
    table, ok = report(results, limits)
    print(table)
    print("PASS" if ok else "FAIL: differences past the thresholds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
