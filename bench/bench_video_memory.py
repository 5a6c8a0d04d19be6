"""Peak memory of a tiny model's forward pass on a long video: the ViT and connector in one call against both in
chunks.

    python bench/bench_video_memory.py [--frames 96 384] [--chunks 0 16] [--model tiny]

Each measurement runs in a fresh subprocess: a random tiny model (tiny preset), one video row of F frames (81
pooled tokens per frame, each frame wrapped in <frame_start>/<frame_end>, as the processor lays out a video), the
input generated on the device and the forward compiled; then the process's peak-RSS mark is reset
(`/proc/self/clear_refs`; `ru_maxrss` cannot be reset, and would keep the compiler's and the input generator's
peaks) and one jitted forward to logits runs. Reported: the peak RSS during the forward (VmHWM), the input bytes
(pixels, pooling, tokens; one copy), net = peak - input, net against the same path's at the fewest frames, and
the rise over the RSS just before the forward. `--chunks 0` is one ViT and one connector call (`vit_chunk`
null), the reference this compares with; other values are `vit_chunk` (crops per device per ViT call; the
connector takes those crops' pooled tokens per call).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

POOL = 9  # 3x3 pooling of the 27x27 patches: 81 visual tokens per frame


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def worker(model: str, frames: int, chunk: int) -> dict:
    import jax
    import jax.numpy as jnp

    from molmo2_jax import host_memory
    from molmo2_jax.config import load_preset
    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import init_params

    config = load_preset(model, [f"vit_chunk={chunk or 'null'}"])
    v, tok = config.vision, config.tokens
    params = init_params(config, 0)
    per_frame = v.num_patches // POOL
    frame_ids = jnp.array([tok.frame_start] + [tok.image_patch] * per_frame + [tok.frame_end], jnp.int32)
    input_ids = jnp.tile(frame_ids, frames)[None]
    batch = {
        "input_ids": input_ids,
        "mm_token_type_ids": jnp.ones_like(input_ids),
        "pixel_values_videos": jax.random.uniform(jax.random.key(1), (1, frames, v.num_patches, v.patch_dim),
                                                  jnp.float32, -1, 1),
        "video_token_pooling": jax.random.randint(jax.random.key(2), (1, frames * per_frame, POOL), 0,
                                                  frames * v.num_patches, jnp.int32),
    }
    batch = jax.block_until_ready(batch)
    input_bytes = sum(x.nbytes for x in batch.values())
    forward = jax.jit(lambda p, b: Molmo2(config).apply({"params": p}, **b)[0])
    compiled = forward.lower(params, batch).compile()
    gc.collect()
    host_memory.trim()  # the compiler's and the input's freed heap, which the process would otherwise keep
    before = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    seconds = time.perf_counter() - start
    return {"frames": frames, "chunk": chunk, "tokens": int(input_ids.shape[1]), "peak": rss("VmHWM"),
            "before": before, "input": input_bytes, "seconds": seconds}


def measure(model: str, frames: int, chunk: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "--worker", model, str(frames), str(chunk)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"worker ({frames} frames, chunk {chunk}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[96, 384])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16], help="vit_chunk values; 0 = one call")
    parser.add_argument("--model", default="tiny", help="model preset")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    mib = 2**20
    print(f"{args.model}: one forward to logits in a fresh process, MiB; net = peak - input; rise = peak - RSS "
          "before the forward")
    print(f"{'ViT, connector':<16} {'frames':>6} {'tokens':>7} {'peak':>8} {'input':>7} {'net':>8} {'net / first':>11} "
          f"{'rise':>7} {'forward s':>9}")
    for chunk in args.chunks:
        first = None
        for frames in sorted(args.frames):
            r = measure(args.model, frames, chunk)
            net = r["peak"] - r["input"]
            first = first or net
            label = "one call" if not chunk else f"vit_chunk={chunk}"
            rise = r["peak"] - r["before"]
            print(f"{label:<16} {frames:>6} {r['tokens']:>7} {r['peak'] / mib:>8.0f} {r['input'] / mib:>7.0f} "
                  f"{net / mib:>8.0f} {net / first:>10.2f}x {rise / mib:>7.0f} {r['seconds']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
