"""KV tiles the blockwise kernel visits per `sequence` shard, natural vs zigzag order (`context_balance`), from
`attention.tile_ranges` on the long-SFT shape: 36,864 tokens, 512-token tiles, `sequence=4`.

Rows: text only; one example of 384 frames; two packed examples of 192 frames. A frame is 5 timestamp text
tokens then 83 visual ones (start, 81 pooled patches, end; visual tokens attend to each other both ways within
an example); each example's text after its frames fills it to its length. The last row: a short video
(96 frames, 1024 text tokens) padded to the length, as the long-SFT bucket pads single examples.

    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/bench_zigzag_tiles.py
"""

from __future__ import annotations

import numpy as np

from molmo2_jax.model import zigzag
from molmo2_jax.model.attention import tile_ranges

LENGTH, TILE, SHARDS = 36864, 512, 4
FRAME_TEXT, FRAME_VISUAL = 5, 83


def example(frames: int, length: int) -> np.ndarray:
    """Visual flags of one example: its frames, then text."""
    frame = np.r_[np.zeros(FRAME_TEXT, bool), np.ones(FRAME_VISUAL, bool)]
    video = np.tile(frame, frames)
    return np.r_[video, np.zeros(length - len(video), bool)]


def row(frames_per_example: list[int], length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and visual flags of a row packing one example per entry (equal lengths, `length` in all),
    padded to LENGTH."""
    n = len(frames_per_example)
    seg = np.r_[np.repeat(np.arange(1, n + 1), length // n), np.zeros(LENGTH - length, int)]
    mm = np.concatenate([*(example(f, length // n) for f in frames_per_example), np.zeros(LENGTH - length, bool)])
    return seg.astype(np.int32), mm


def visited(seg: np.ndarray, mm: np.ndarray, order: np.ndarray) -> list[int]:
    """Per shard: the sum over its query tiles of the key tiles in their range; keys in natural order."""
    idx = np.arange(LENGTH, dtype=np.int32)
    as_tiles = lambda x: x.reshape(-1, 1, TILE)  # [n, B'=1, tile]
    k_vecs = tuple(as_tiles(x) for x in (seg, idx, mm))
    out = []
    for local in np.split(order, SHARDS):  # the shard's tokens (natural slots), in the order it holds them
        lo, hi = tile_ranges(tuple(as_tiles(x[local]) for x in (seg, idx, mm)), k_vecs)[:2]
        out.append(int(np.sum(np.asarray(hi) - np.asarray(lo))))
    return out


def main() -> None:
    chunk = LENGTH // (2 * SHARDS)
    orders = {"natural": np.arange(LENGTH),
              "zigzag": np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in zigzag.chunk_order(SHARDS)])}
    rows = {"text only": [0], "one 384-frame example": [384], "two packed 192-frame": [192, 192],
            "one 96-frame, padded": ([96], 96 * (FRAME_TEXT + FRAME_VISUAL) + 1024)}
    print(f"KV tiles visited per shard, {LENGTH} tokens, {TILE}-token tiles, sequence={SHARDS}")
    for name, frames in rows.items():
        seg, mm = row(*frames) if isinstance(frames, tuple) else row(frames)
        for order_name, order in orders.items():
            v = visited(seg, mm, order)
            print(f"{name:24s} {order_name:8s} {' / '.join(map(str, v)):>28s}  max/mean {max(v) / np.mean(v):.2f}")


if __name__ == "__main__":
    main()
