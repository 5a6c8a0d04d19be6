"""`molmo2-jax export SRC DST [--dtype bfloat16] [--step N] [--tokenizer-from HF_DIR] [--overwrite]`: export a
checkpoint (converted, a training run or step, or Hugging Face) to a Hugging Face Molmo2 checkpoint in the released
tensor layout, sharded.

A LoRA run exports its adapters merged into the base it trained on, or alone as a PEFT adapter directory
(`--adapter-only`); `--adapter DIR` merges a PEFT adapter into the checkpoint SRC."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true",
                      help="LoRA run: write its adapters as a PEFT adapter directory instead of the merged model")
    lora.add_argument("--adapter", default=None, metavar="DIR", help="merge this PEFT adapter into SRC")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.checkpoint import converted, peft
    from molmo2_jax.checkpoint.export import export_to_hf

    log = lambda line: print(line, file=sys.stderr, flush=True)
    export_args = dict(dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1e9),
                       log=log)
    if args.adapter:
        peft.export_merged(args.src, args.adapter, args.dst, **export_args)
    elif args.adapter_only:
        converted.prepare_destination(Path(args.dst).absolute(), args.overwrite)
        peft.export_run_adapter(args.src, args.dst, args.step)
        log(f"done: {args.dst}")
    elif peft.lora_run(args.src, args.step):
        peft.export_run_merged(args.src, args.dst, args.step, **export_args)
    else:
        export_to_hf(args.src, args.dst, step=args.step, side_files_from=args.tokenizer_from, **export_args)
    return 0
