"""KV tiles the decoder's blockwise attention visits per `sequence` shard, natural vs zigzag order
(`context_balance`), from `attention.tile_ranges` on the mask vectors of one 36,864-token row: text only, one
384-frame video, two packed 192-frame videos (per frame 4 timestamp tokens, <frame_start>, 81 patches, <frame_end>).

    python bench/bench_context_balance.py [--length 36864] [--shards 4] [--tile 512]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from molmo2_jax.model.attention import tile_ranges
from molmo2_jax.model.zigzag import chunk_order


def example(length: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots' visual flags of one example: 8 prompt tokens, the frames, then text to `length`."""
    per_frame = [False] * 4 + [True] * 83
    mm = [False] * 8 + per_frame * frames
    return np.asarray(mm + [False] * (length - len(mm)))


def row(length: int, examples: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    part = length // examples
    seg = np.repeat(np.arange(1, examples + 1), part)
    return seg, np.concatenate([example(part, frames) for _ in range(examples)])


def tiles_per_shard(seg, mm, shards: int, tile: int, zigzag: bool) -> list[int]:
    length = len(seg)
    idx = np.arange(length)
    order = chunk_order(shards) if zigzag else np.arange(2 * shards)
    perm = idx.reshape(2 * shards, -1)[order].reshape(-1)  # slot at each position of the decoder's order
    k_vecs = tuple(jnp.asarray(x.reshape(-1, 1, tile)) for x in (seg, idx, mm))  # keys in natural order
    out = []
    for q in np.split(perm, shards):
        q_vecs = tuple(jnp.asarray(x[q].reshape(-1, 1, tile)) for x in (seg, idx, mm))
        lo, hi = tile_ranges(q_vecs, k_vecs)[:2]
        out.append(int(np.sum(np.asarray(hi) - np.asarray(lo))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=36864)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    for name, (examples, frames) in {"text only": (1, 0), "one 384-frame video": (1, 384),
                                     "two packed 192-frame videos": (2, 192)}.items():
        seg, mm = row(args.length, examples, frames)
        for zigzag in (False, True):
            tiles = tiles_per_shard(seg, mm, args.shards, args.tile, zigzag)
            print(f"{name:30s} {'zigzag ' if zigzag else 'natural'}  {' / '.join(map(str, tiles))}  "
                  f"max / mean {max(tiles) / np.mean(tiles):.2f}")


if __name__ == "__main__":
    main()
