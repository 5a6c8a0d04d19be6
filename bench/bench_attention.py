"""Dense vs blockwise attention on this machine, side by side in one run: forward and forward+backward time and
XLA's temporary bytes, for decoder-shaped attention with the Molmo2 mask at several lengths, the ViT's unmasked
729-patch attention, and one cached decode step. float32 on CPU. This times the attention functions alone; what
users call (prefill, generate, train step, against the reference) is timed by bench/bench_api.py.

    python bench/bench_attention.py [--lengths 512,2048,8192] [--heads 8] [--kv-heads 2] [--head-dim 64]
                                    [--block 512] [--repeats 3]
    python bench/bench_attention.py --vit 5,729,6,64 [--block 512] [--repeats 13]

--vit CROPS,PATCHES,HEADS,HEAD_DIM: only the ViT's unmasked attention at that shape (5,729,6,64: bench/bench_api.py's
65m model on one 640x480 image), blockwise forward against torch's `scaled_dot_product_attention` on the same
inputs, calls alternating; wall and process CPU time (min and median), ratios SDPA / ours (> 1: ours faster).
CPU time is the steadier figure on a shared machine.

The decoder layout is one example per row: a 32-token prompt, then visual tokens (the bidirectional block) over
the first half of the sequence, then text. The ratio column is dense time / blockwise time (> 1: blockwise wins).

Recorded 2026-12-02, BEFORE the blockwise prefill looped over (batch row, KV head) pairs (issue 23: since then
the T > 1 rows run 3-8x faster blockwise and `auto` picks blockwise from 128 keys), on this repository's 2-core
CPU machine (shared, so times are noisy; both paths of a row come
from the same run), defaults (8 heads, 2 KV heads, head dim 64, block 512, float32):

| case | kind | dense ms / MiB | blockwise ms / MiB | ratio |
|---|---|---|---|---|
| decoder 512 | forward | 48.8 / 16.3 | 24.1 / 16.3 | 2.03 |
| decoder 512 | fwd+bwd | 92.7 / 27.0 | 123.9 / 41.0 | 0.75 |
| decoder 1024 | forward | 250 / 65.0 | 56.6 / 22.3 | 4.42 |
| decoder 1024 | fwd+bwd | 830 / 103 | 310 / 32.1 | 2.67 |
| decoder 2048 | forward | 1383 / 260 | 167 / 27.3 | 8.29 |
| decoder 2048 | fwd+bwd | 8212 / 400 | 1723 / 37.1 | 4.77 |
| decoder 8192 | forward | 32080 / 4162 | 6301 / 50.3 | 5.09 |
| decoder 8192 | fwd+bwd | 174373 / 6256 | 16772 / 67.5 | 10.40 |
| ViT 8 x 729 | forward | 3357 / 76.9 | 2144 / 262 | 1.57 |
| ViT 8 x 729 | fwd+bwd | 6992 / 1090 | 5850 / 419 | 1.20 |
| decode T=1, S=8192 | forward | 253 / 32.2 | 8.1 / 12.0 | 31.4 |

(8192: `--lengths 8192 --repeats 1 --skip-vit`, a separate run; an earlier run gave the ViT ratios 1.01 / 1.04.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from molmo2_jax.model.attention import blockwise_attention
from molmo2_jax.model.layers import MaskInfo, dot_product_attention


def decoder_mask(batch: int, length: int, keys: int | None = None) -> MaskInfo:
    keys = keys or length
    idx = np.arange(keys)
    mm = (idx >= 32) & (idx < 32 + keys // 2)
    k_idx = np.broadcast_to(idx, (batch, keys))
    q_idx = k_idx[:, keys - length:]
    seg, k_mm = np.ones((batch, keys), np.int32), np.broadcast_to(mm, (batch, keys))
    return MaskInfo(*(jnp.asarray(a) for a in (seg[:, :length], q_idx, k_mm[:, keys - length:], seg, k_idx, k_mm)))


def timed(fn, args, repeats: int) -> tuple[float, int]:
    """Median seconds of a jitted call (after a warm-up) and XLA's temporary bytes."""
    jitted = jax.jit(fn)
    temp = jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def compare(name: str, q, k, v, mask: MaskInfo | None, block: int, repeats: int) -> None:
    dense = lambda q, k, v: dot_product_attention(q, k, v, None if mask is None else mask.allowed())
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=block, block_kv=block)
    cot = jnp.ones(q.shape, q.dtype)
    for kind, wrap in (("forward", lambda f: f),
                       ("fwd+bwd", lambda f: lambda q, k, v: jax.vjp(f, q, k, v)[1](cot))):
        (td, md), (tb, mb) = (timed(wrap(f), (q, k, v), repeats) for f in (dense, blockwise))
        print(f"{name:34s} {kind:8s} dense {td * 1e3:9.1f} ms {md / 2**20:8.1f} MiB | blockwise {tb * 1e3:9.1f} ms "
              f"{mb / 2**20:8.1f} MiB | ratio {td / tb:5.2f}", flush=True)


def vit_against_sdpa(shape: tuple[int, ...], block: int, repeats: int) -> None:
    import torch

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, None, block_q=block, block_kv=block))
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    calls = {"ours": lambda: jax.block_until_ready(ours(jq, jk, jv)),
             "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)}
    out = np.asarray(calls["ours"]())
    with torch.inference_mode():
        diff = np.abs(out - calls["SDPA"]().transpose(1, 2).numpy()).max()
        times = {name: ([], []) for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
    print(f"ViT attention {list(shape)}, no mask, block {block}, torch {torch.get_num_threads()} threads, "
          f"max |ours - SDPA| {diff:.1e}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:5s} wall min {min(wall) * 1e3:7.1f} median {statistics.median(wall) * 1e3:7.1f} ms | "
              f"CPU min {min(cpu) * 1e3:7.1f} median {statistics.median(cpu) * 1e3:7.1f} ms")
    (ow, oc), (sw, sc) = times["ours"], times["SDPA"]
    print(f"  SDPA / ours: wall {min(sw) / min(ow):.2f} (min) {statistics.median(sw) / statistics.median(ow):.2f} "
          f"(median), CPU {min(sc) / min(oc):.2f} (min) {statistics.median(sc) / statistics.median(oc):.2f} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--vit", metavar="CROPS,PATCHES,HEADS,HEAD_DIM",
                        help="only the ViT attention at this shape against torch SDPA")
    args = parser.parse_args()
    if args.vit:
        parts = args.vit.split(",")
        if len(parts) != 4 or not all(x.isdigit() and int(x) > 0 for x in parts):
            parser.error(f"--vit {args.vit}: give four positive integers CROPS,PATCHES,HEADS,HEAD_DIM, e.g. 5,729,6,64")
        shape = tuple(map(int, parts))
        vit_against_sdpa(shape, args.block, args.repeats)
        return
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    h, kv, d = args.heads, args.kv_heads, args.head_dim
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; heads {h}, kv heads {kv}, head dim {d}, "
          f"block {args.block}, float32")
    for length in map(int, args.lengths.split(",")):
        q, k, v = normal(1, length, h, d), normal(1, length, kv, d), normal(1, length, kv, d)
        compare(f"decoder T=S={length}", q, k, v, decoder_mask(1, length), args.block, args.repeats)
    if not args.skip_vit:  # SigLIP2 so400m attention: 16 heads x 72, 729 patches, no mask; 8 crops
        q, k, v = (normal(8, 729, 16, 72) for _ in range(3))
        compare("ViT 8 crops x 729", q, k, v, None, args.block, args.repeats)
    keys = max(map(int, args.lengths.split(",")))  # one decode step against a cache of `keys` slots
    q, k, v = normal(1, 1, h, d), normal(1, keys, kv, d), normal(1, keys, kv, d)
    compare(f"decode T=1 S={keys}", q, k, v, decoder_mask(1, 1, keys), args.block, args.repeats)


if __name__ == "__main__":
    main()
