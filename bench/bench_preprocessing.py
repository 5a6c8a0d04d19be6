"""Preprocessing throughput: molmo2_jax (numpy / PyAV) against the transformers Molmo2Processor, same inputs.

    python bench/bench_preprocessing.py [--repeats 5] [--frames 64] [--torch-threads N]

Images: full processor calls (load + tile + tokenize) on a mix of sizes. Video: (a) already-decoded
frames through both processors; (b) from an MP4 file, our sampled decoding + processing against the
released PyAV reader's approach (decode every frame, then pick the sampled ones) + the reference.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed_pair(ours, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and of the reference, runs interleaved so machine load hits both alike."""
    ours(), ref()  # warm-up (caches, lazy imports)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (ref, t_ref)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return float(np.median(t_ours)), float(np.median(t_ref))


def report(name: str, count: int, unit: str, ours: float, ref: float) -> None:
    print(f"{name:<38} ours {count / ours:9.1f} {unit}/s   reference {count / ref:9.1f} {unit}/s   "
          f"speed-up x{ref / ours:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--frames", type=int, default=64, help="decoded frames for the frame benchmark")
    parser.add_argument("--torch-threads", type=int, default=None, help="threads for the reference (default: torch's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_pre_") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    """All benchmark cases; files go to `tmp`."""
    import av
    import torch
    from ref_tokenizer import make_reference_processor, make_tokenizer_dir
    from test_preprocessing_video import write_mp4

    from molmo2_jax.preprocessing import Molmo2Processor, decode_video, sample_times

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch threads: {torch.get_num_threads()}  (reference uses them; ours is single-threaded numpy)")
    directory = make_tokenizer_dir(tmp / "tok")
    ref, ours = make_reference_processor(directory), Molmo2Processor.from_pretrained(directory)

    rs = np.random.RandomState(0)
    for label, shapes in {
        "images 480x640": [(480, 640)] * 4,
        "images 1066x1600": [(1066, 1600)] * 4,
        "images 3000x4000": [(3000, 4000)] * 2,
        "images mixed (5 per prompt)": [(300, 500), (90, 60), (700, 300), (378, 378), (1200, 1500)],
    }.items():
        images = [rs.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in shapes]
        text = "".join(f"Image {i + 1}<|image|>" for i in range(len(images))) + "Describe."
        report(label, len(images), "img", *timed_pair(functools.partial(ours, text, images=images),
                                                      functools.partial(ref, text=text, images=images,
                                                                        return_tensors="np"),
                                                      args.repeats))

    frames = rs.randint(0, 256, (args.frames, 360, 640, 3)).astype(np.uint8)
    times = np.arange(args.frames) / 2.0
    meta = [{"total_num_frames": args.frames, "fps": 2.0, "frames_indices": list(range(args.frames))}]
    report(f"decoded frames 640x360 (x{args.frames})", args.frames, "frame", *timed_pair(
        lambda: ours("<|video|>What happens?", videos=[(frames, times)]),
        lambda: ref(text="<|video|>What happens?", videos=[frames], do_sample_frames=False, video_metadata=meta,
                    return_tensors="np"),
        args.repeats))

    path = write_mp4(tmp / "clip.mp4", 60, 24, size=256)  # 60 s, 1440 frames -> 121 sampled

    def reference_pipeline():
        with av.open(path) as container:
            all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]  # hub-style reader
        duration = len(all_frames) / 24
        times = sample_times(duration)
        ends = np.append(np.arange(1, len(all_frames)) / 24, duration)
        index = np.minimum(np.searchsorted(ends, times, side="right"), len(all_frames) - 1)
        picked = np.stack([all_frames[i] for i in index])
        m = [{"total_num_frames": len(picked), "fps": 24.0, "frames_indices": list(times * 24)}]
        return ref(text="<|video|>What happens?", videos=[picked], do_sample_frames=False, video_metadata=m,
                   return_tensors="np")

    n_sampled = len(decode_video(path).timestamps)
    report(f"MP4 60 s 256x256 ({n_sampled} sampled frames)", n_sampled, "frame",
           *timed_pair(lambda: ours("<|video|>What happens?", videos=[path]), reference_pipeline, args.repeats))


if __name__ == "__main__":
    main()
