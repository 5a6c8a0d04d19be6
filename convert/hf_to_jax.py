"""Convert a Hugging Face Molmo2 checkpoint into our format (config JSON + Orbax params + tokenizer files).

    python convert/hf_to_jax.py SRC_HF_DIR DST_DIR [--dtype bfloat16] [--overwrite]
"""

import argparse
import sys

from molmo2_jax.checkpoint.convert import convert_hf_to_jax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (must be absent or empty unless --overwrite)")
    parser.add_argument("--dtype", default="float32", help="param dtype: float32 (default), bfloat16, float16")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    args = parser.parse_args(argv)
    try:
        convert_hf_to_jax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:  # our errors derive from ValueError; file problems are OSError
        print(f"hf_to_jax.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
