"""`molmo2-jax convert SRC_HF_DIR DST_DIR [--dtype bfloat16] [--overwrite]`: convert a Hugging Face Molmo2
checkpoint into our format (config JSON + Orbax params + tokenizer files), streamed."""

from __future__ import annotations

import argparse
import sys

HELP = "convert a Hugging Face Molmo2 checkpoint into our format (config JSON + Orbax params + tokenizer files)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (must be absent or empty unless --overwrite)")
    parser.add_argument("--dtype", default="float32", help="param dtype: float32 (default), bfloat16, float16")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.checkpoint.convert import convert_hf_to_jax

    convert_hf_to_jax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
