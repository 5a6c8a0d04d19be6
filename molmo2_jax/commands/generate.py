"""`molmo2-jax generate --checkpoint DIR [--image PATH ... | --video PATH] --prompt TEXT`: answer a prompt about
images or a video; optionally as JSON with the parsed points / counts / tracks, and drawn on the media.
Timings (load, compile, prefill, decode, tokens/s) go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from molmo2_jax.errors import Molmo2Error

HELP = "answer a prompt about images or a video with a Molmo2 checkpoint (points, counts, tracks parsed / drawn)"


class RequestError(Molmo2Error):
    """A generate request that cannot run (conflicting or missing media, bad output path)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face or converted) "
                                                            "with its tokenizer and processor files")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--video", metavar="PATH", help="a video file")
    parser.add_argument("--prompt", required=True, help="the question / instruction")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-crops", type=int, default=None, help="override the checkpoint's image tiling limit")
    parser.add_argument("--num-frames", type=int, default=None, help="override the checkpoint's video frame limit")
    parser.add_argument("--vit-chunk", type=int, default=None, metavar="N",
                        help="run the ViT over N crops / frames at a time (bounds a long video's memory); default: "
                             "the checkpoint's setting, else all at once (on the CPU: as many as fit a thread's "
                             "malloc heap, see molmo2_jax.load)")
    parser.add_argument("--json", action="store_true", help='print {"answer", "groundings", "count"} as JSON')
    parser.add_argument("--draw", metavar="OUT", help="draw the points (.png, images) or tracks (.gif/.mp4, video)")
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory for this checkpoint")
    parser.add_argument("--merge-adapter", action="store_true", help="add the adapter into the base weights")


def _check_request(args: argparse.Namespace) -> None:
    """Fail before loading anything when the request cannot succeed."""
    if not Path(args.checkpoint).is_dir():
        raise RequestError(f"--checkpoint {args.checkpoint}: directory not found")
    if args.adapter and not Path(args.adapter).is_dir():
        raise RequestError(f"--adapter {args.adapter}: directory not found")
    if args.image and args.video:
        raise RequestError("give --image or --video, not both (one request is about images or about a video)")
    for flag, path in [("--image", p) for p in args.image] + [("--video", args.video)] * bool(args.video):
        if not Path(path).is_file():
            raise RequestError(f"{flag} {path}: file not found")
    if args.draw:
        if not (args.image or args.video):
            raise RequestError("--draw needs an --image or a --video to draw on")
        wanted = (".gif", ".mp4") if args.video else (".png", ".jpg", ".jpeg")
        if Path(args.draw).suffix.lower() not in wanted:
            raise RequestError(f"--draw {args.draw}: use a {' or '.join(wanted)} file for "
                               f"{'a video' if args.video else 'images'}")
        if not Path(args.draw).resolve().parent.is_dir():
            raise RequestError(f"--draw {args.draw}: directory {Path(args.draw).resolve().parent} does not exist")
    if args.max_new_tokens < 1:
        raise RequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.vit_chunk is not None and args.vit_chunk < 1:
        raise RequestError(f"--vit-chunk must be >= 1 (crops per ViT call), got {args.vit_chunk}")


def report(answer: str, image_sizes: list[tuple[int, int]] | None = None,
           video_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The `--json` output: the answer, its groundings in pixels of the media, and the stated count."""
    from molmo2_jax.grounding import parse, parse_count

    groundings = parse(answer, image_sizes=image_sizes or None, video_size=video_size)
    return {"answer": answer, "groundings": [g.to_dict() for g in groundings], "count": parse_count(answer)}


def _video_size(path: str) -> tuple[int, int]:
    """(width, height) of a video's frames, from its stream header."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


def run(args: argparse.Namespace) -> int:
    _check_request(args)
    import numpy as np

    import molmo2_jax
    from molmo2_jax.grounding import draw_points, draw_tracks, parse
    from molmo2_jax.preprocessing import Molmo2Processor, decode_video, load_image

    start = time.perf_counter()
    processor = Molmo2Processor.from_pretrained(args.checkpoint)
    images = [load_image(p) for p in args.image]  # upright RGB arrays, read once for the model and the drawing
    video = None
    if args.video:
        cfg = processor.video_config
        # full-size frames only when they are drawn on; otherwise decode straight to the crop size
        video = decode_video(args.video, num_frames=args.num_frames or cfg.num_frames, max_fps=cfg.max_fps,
                             resize_to=None if args.draw else cfg.size)
    content = [{"type": "image"} for _ in images] + [{"type": "video"}] * bool(video) + [
        {"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = processor(prompt, images=images or None, videos=[video] if video else None, max_crops=args.max_crops)
    model = molmo2_jax.load(args.checkpoint, dtype=args.dtype, adapter=args.adapter, merge_adapter=args.merge_adapter,
                            **({} if args.vit_chunk is None else {"vit_chunk": args.vit_chunk}))
    load_seconds = time.perf_counter() - start

    result = model.generate(inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, tokenizer=processor.tokenizer)
    answer = result.texts[0]
    print(f"load {load_seconds:.2f} s | compile {result.compile_seconds:.2f} s | "
          f"prefill {result.prefill_seconds:.3f} s ({result.prompt_tokens[0]} prompt tokens) | "
          f"decode {result.decode_seconds:.3f} s "
          f"({result.num_new_tokens} new tokens, {result.tokens_per_second:.1f} tokens/s)", file=sys.stderr)

    image_sizes = [(im.shape[1], im.shape[0]) for im in images] or None
    video_size = None if video is None else _video_size(args.video)
    if args.json:
        print(json.dumps(report(answer, image_sizes, video_size)))
    else:
        print(answer)
    if args.draw:
        groundings = parse(answer, image_sizes=image_sizes, video_size=video_size)
        if video is None:  # several images: each drawn to OUT, OUT-2, OUT-3, ...
            out = Path(args.draw)
            for i, image in enumerate(images):
                path = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
                draw_points(image, groundings, path, image_index=i)
        else:
            draw_tracks(np.asarray(video.frames), video.timestamps, groundings, args.draw)
    return 0
