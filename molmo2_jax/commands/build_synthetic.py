"""`molmo2-jax build-synthetic --out DIR`: generate the synthetic grounding set (TFDS array_record files),
its sentencepiece tokenizer and processor configs. No downloads."""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = "generate the synthetic shapes grounding dataset (images + short videos) and its tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from molmo2_jax.data.synthetic import SyntheticConfig

    d = SyntheticConfig()
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a set already in --out if it was built with these same settings")
    parser.add_argument("--num-train", type=int, default=d.num_train)
    parser.add_argument("--num-eval", type=int, default=d.num_eval)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image / frame side in pixels")
    parser.add_argument("--max-count", type=int, default=d.max_count, help="objects of the asked kind: 0..N")
    parser.add_argument("--max-distractors", type=int, default=d.max_distractors, help="objects of other kinds: 0..N")
    parser.add_argument("--object-size", type=int, nargs=2, default=d.object_size, metavar=("MIN", "MAX"),
                        help="side of an object's bounding box in pixels")
    parser.add_argument("--video-frames", type=int, default=d.video_frames)
    parser.add_argument("--tasks", default=None,
                        help='task weights as JSON, e.g. \'{"point": 0.5, "count": 0.5}\' (default: all tasks)')
    parser.add_argument("--vocab-size", type=int, default=640, help="sentencepiece vocabulary size")
    parser.add_argument("--crop-size", type=int, default=378,
                        help="processor crop size in pixels (multiple of 14; smaller = fewer patches per crop)")
    parser.add_argument("--max-crops", type=int, default=8, help="processor image tiling limit")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax.data.errors import DataError
    from molmo2_jax.data.spm import model_token_settings
    from molmo2_jax.data.synthetic import SyntheticConfig
    from molmo2_jax.data.tfds_builder import build_synthetic, dataset_dir

    changes = {"num_train": args.num_train, "num_eval": args.num_eval, "seed": args.seed,
               "image_size": args.image_size, "max_count": args.max_count, "max_distractors": args.max_distractors,
               "object_size": tuple(args.object_size), "video_frames": args.video_frames}
    if args.tasks:
        try:
            tasks = json.loads(args.tasks)
            changes["task_weights"] = tuple((str(k), float(v)) for k, v in tasks.items())
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise DataError(f"--tasks must be a JSON object of task -> weight, got {args.tasks!r}") from None
    config = dataclasses.replace(SyntheticConfig(), **changes)
    out = build_synthetic(args.out, config, vocab_size=args.vocab_size, crop_size=args.crop_size,
                          max_crops=args.max_crops, overwrite=args.overwrite, reuse=args.reuse)
    settings = model_token_settings(out / "tokenizer")
    print(f"dataset:   {dataset_dir(out)} (splits train={config.num_train}, validation={config.num_eval})")
    print(f"tokenizer: {out / 'tokenizer'}")
    print(f"model settings: {json.dumps(settings)}")
    return 0
