"""`molmo2-jax export SRC DST [--dtype bfloat16] [--step N] [--tokenizer-from HF_DIR] [--overwrite]`: export a
checkpoint (converted, a training run or step, or Hugging Face) to a Hugging Face Molmo2 checkpoint in the released
tensor layout, sharded."""

from __future__ import annotations

import argparse
import sys

HELP = "export any Molmo2 checkpoint to a Hugging Face one in the released tensor layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from molmo2_jax.checkpoint.export import MAX_SHARD_BYTES

    parser.add_argument("src", help="converted, training run / step, or Hugging Face checkpoint directory")
    parser.add_argument("dst", help="output directory (must be absent or empty unless --overwrite)")
    parser.add_argument("--dtype", default="float32", help="tensor dtype: float32 (default), bfloat16, float16")
    parser.add_argument("--step", type=int, default=None, help="step of a training run (default: the latest)")
    parser.add_argument("--tokenizer-from", default=None,
                        help="directory to copy tokenizer/processor files from (default: the source)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="shard size limit (GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.checkpoint.export import export_to_hf

    export_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, step=args.step,
                 side_files_from=args.tokenizer_from, max_shard_bytes=int(args.max_shard_gb * 1e9),
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
