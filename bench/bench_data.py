"""Input pipeline throughput and packing efficiency on the synthetic set, against a plain loop over the
transformers Molmo2Processor on the same records.

    python bench/bench_data.py [--examples 48] [--batch-size 4]

Ours: the Grain pipeline (decode + tile + tokenize in 0, 1, 2 worker processes, then skip-bad), timed
over `--examples` examples after the first, without end of epoch (worker start-up reported apart).
Reference: one process decoding the same PNG / MP4 bytes (PIL, PyAV) and calling the transformers
processor on the same prompt. Then the real-token / crop / frame shares of packed batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

KINDS = {"image": (("point", 0.4), ("count", 0.4), ("caption", 0.1), ("qa", 0.1)),
         "video": (("track", 0.7), ("video_count", 0.3))}


def reference_rate(ref, records) -> tuple[float, int]:
    """Seconds for the transformers processor to turn the records into model inputs, and crops + frames made."""
    import av
    from PIL import Image

    from molmo2_jax.preprocessing.chat_template import apply_chat_template

    start, frames = time.perf_counter(), 0
    for record in records:
        messages = json.loads(record["messages"])
        media = [{"type": "image"}] * len(record["images"]) + ([{"type": "video"}] if len(record["video"]) else [])
        messages[0] = {"role": "user", "content": media + [{"type": "text", "text": messages[0]["content"]}]}
        text = apply_chat_template(messages, add_generation_prompt=False)
        if len(record["video"]):
            with av.open(io.BytesIO(record["video"])) as container:
                video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            meta = [{"total_num_frames": len(video), "fps": 2.0, "frames_indices": list(range(len(video)))}]
            out = ref(text=text, videos=[video], do_sample_frames=False, video_metadata=meta, return_tensors="np")
            frames += len(out["pixel_values_videos"])
        else:
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in record["images"]]
            frames += len(ref(text=text, images=images, return_tensors="np")["pixel_values"])
    return time.perf_counter() - start, frames


def pipeline_rate(config, count: int) -> tuple[float, float, int]:
    """(start-up s, steady s, crops + frames) for `count` converted examples after the first one."""
    from molmo2_jax.data import examples

    t0 = time.perf_counter()
    it = iter(examples(dataclasses.replace(config, num_epochs=None)))  # steady state: no end-of-epoch wait
    next(it)
    t1 = time.perf_counter()
    frames = 0
    for _ in range(count):
        ex = next(it)
        frames += len(ex.get("pixel_values_videos", ())) + len(ex.get("pixel_values", ()))
    t2 = time.perf_counter()
    it.close()
    return t1 - t0, t2 - t1, frames


def packing_shares(config) -> dict[str, float]:
    from molmo2_jax.data import dataset, fill_stats

    stats = [fill_stats(b) for b in dataset(config)]
    return {k: float(np.mean([s[k] for s in stats])) for k in ("token_share", "crop_share", "frame_share")} | {
        "batches": len(stats), "examples_per_batch": float(np.mean([s["examples"] for s in stats]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48, help="examples per kind (image, video)")
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per batch")
    args = parser.parse_args()

    from ref_tokenizer import make_reference_processor, make_tokenizer_dir

    from molmo2_jax.data import (
        Bucket,
        PipelineConfig,
        Source,
        SyntheticConfig,
        build_synthetic,
        data_source,
        dataset_dir,
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    ref = make_reference_processor(make_tokenizer_dir(tmp / "ref_tok"))
    # Two static shapes: image batches (many crops, few frames) and video batches (the reverse).
    buckets = (Bucket(seq_len=2048, max_crops=40, max_image_tokens=7840, max_frames=4, max_video_tokens=324),
               Bucket(seq_len=2048, max_crops=4, max_image_tokens=784, max_frames=64, max_video_tokens=5184))
    print(f"{'':<24}{'examples/s':>12}{'crops+frames/s':>16}   {'start-up s':>10}   vs reference (examples/s)")
    for kind, tasks in KINDS.items():
        root = build_synthetic(tmp / kind, SyntheticConfig(num_train=args.examples, num_eval=1, task_weights=tasks))
        source = Source(str(dataset_dir(root)))
        records = [data_source(dataset_dir(root), "train")[i] for i in range(args.examples)]
        ref_s, ref_frames = reference_rate(ref, records)
        print(f"{kind + ' reference':<24}{args.examples / ref_s:12.1f}{ref_frames / ref_s:16.1f}")
        config = PipelineConfig(processor_dir=str(root / "tokenizer"), sources=(source,), batch_size=args.batch_size,
                                buckets=buckets, num_epochs=1, shuffle=False, process_index=0, process_count=1)
        for workers in (0, 1, 2):
            startup, steady, frames = pipeline_rate(dataclasses.replace(config, num_workers=workers), args.examples)
            rate = args.examples / steady
            print(f"{f'{kind} ours, {workers} workers':<24}{rate:12.1f}{frames / steady:16.1f}   {startup:10.2f}   "
                  f"x{rate / (args.examples / ref_s):.2f}")
        shares = packing_shares(config)
        print(f"{kind} packing ({args.batch_size} rows x 2048 tokens): real tokens {shares['token_share']:.1%}, "
              f"real crops {shares['crop_share']:.1%}, real frames {shares['frame_share']:.1%}, "
              f"{shares['examples_per_batch']:.1f} examples / batch over {shares['batches']} batches")


if __name__ == "__main__":
    main()
