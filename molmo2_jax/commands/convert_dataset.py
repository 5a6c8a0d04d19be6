"""`molmo2-jax convert-dataset --schema S --data D --media M --out manifest.jsonl`: a released Molmo2 /
PixMo dataset (hub parquet or JSON on local disk) as a JSONL training manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from molmo2_jax.errors import Molmo2Error

HELP = "turn a released Molmo2 / PixMo dataset (local parquet / JSON + media dir) into a JSONL training manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schema", required=True,
                        help="pixmo-points, pixmo-count, molmo2-videopoint, molmo2-videotrack, "
                             "molmo2-track-instruction, molmo2-humanqa, molmo2-capqa, molmo2-subtitleqa, molmo2-cap, "
                             "molmo2-multiimagepoint, molmo2-multiimageqa or molmo2-synmultiimageqa")
    parser.add_argument("--data", required=True, help="a .parquet / .json / .jsonl file or a directory of them")
    parser.add_argument("--media", required=True,
                        help="directory holding the images / videos (molmo2-synmultiimageqa writes its images there)")
    parser.add_argument("--style", default="point", help="point or count: the task of point annotations")
    parser.add_argument("--out", required=True, help="the manifest to write (.jsonl)")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.data.released import manifest_records, write_manifest

    if not Path(args.out).resolve().parent.is_dir():
        raise Molmo2Error(f"--out {args.out}: directory {Path(args.out).resolve().parent} does not exist")
    records, skipped = manifest_records(args.schema, args.data, args.media, style=args.style,
                                        log=lambda line: print(line, file=sys.stderr))
    write_manifest(records, args.out)
    print(f"wrote {len(records)} examples to {args.out}; skipped {len(skipped)} rows", file=sys.stderr)
    return 0
