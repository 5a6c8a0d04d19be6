"""Load balance for context parallelism: the decoder's tokens in zigzag order (`Molmo2Config.context_balance`).

With the sequence split over S `sequence` shards in contiguous blocks, a causal mask gives shard i's queries
i + 1 blocks of keys to visit: the last shard works 2S - 1 times as long as the first (text only). In zigzag
order the sequence is cut into 2S chunks and shard i holds chunks i and 2S - 1 - i, so every shard visits the
same number of key tiles.

`Molmo2.__call__` moves the decoder's per-token inputs (embeddings, positions, mask vectors) into this order after
the embedding and moves the outputs back; the mask's slot vectors keep each token's original slot, so the
result is the same. Inside attention (`attention.per_device`) the gathered keys are put back in natural order
(`natural_keys`), so each query tile's range of key tiles stays one contiguous run (the tile loops visit ranges).

The moves are two collective permutes over `sequence` (`ppermute` in `shard_map`): XLA partitions a static
gather along a sharded axis as an all-gather of the whole sequence, and slices + concatenate as 24 collective
permutes and 9 all-to-alls (measured for S = 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

AXIS = "sequence"


def shards(length: int) -> int:
    """S when the current mesh splits a sequence of `length` over S > 1 `sequence` shards in 2S equal chunks;
    else 0 (no zigzag: no mesh, one shard, or a length 2S does not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    s = 1 if mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]
    return s if s > 1 and length % (2 * s) == 0 else 0


def chunk_order(s: int) -> np.ndarray:
    """The natural chunk at each zigzag position: 0, 2S-1, 1, 2S-2, ... (shard i holds positions 2i, 2i+1)."""
    return np.stack([np.arange(s), 2 * s - 1 - np.arange(s)], 1).reshape(-1)


def to_zigzag(x: jax.Array, s: int, axis: int = 1) -> jax.Array:
    """`x` split over `sequence` along `axis`, natural order -> zigzag order."""
    return _move(x, s, axis, np.argsort(chunk_order(s)))


def from_zigzag(x: jax.Array, s: int, axis: int = 1) -> jax.Array:
    """`x` split over `sequence` along `axis`, zigzag order -> natural order."""
    return _move(x, s, axis, chunk_order(s))


def natural_keys(x: jax.Array, s: int) -> jax.Array:
    """A whole (gathered) sequence `[B, L, ...]` in zigzag order -> natural order; a local, static reorder."""
    chunks = x.reshape(x.shape[0], 2 * s, x.shape[1] // (2 * s), *x.shape[2:])
    return jnp.take(chunks, np.argsort(chunk_order(s)), axis=1).reshape(x.shape)


def _move(x: jax.Array, s: int, axis: int, target: np.ndarray) -> jax.Array:
    """Chunk p of `x` (2S chunks along `axis`; shard p // 2 holds it as its half p % 2) moved to position
    `target[p]`, in two collective permutes (`_schedule`)."""
    perms, send, land = _schedule(s, target)

    def local(x):
        me = jax.lax.axis_index(AXIS)
        halves = jnp.split(x, 2, axis)
        got = [jax.lax.ppermute(jnp.where(jnp.asarray(send[c])[me] == 0, *halves), AXIS, perms[c]) for c in (0, 1)]
        first = jnp.asarray(land[0])[me] == 0  # what the first permute brought goes to the first half
        return jnp.concatenate([jnp.where(first, *got), jnp.where(first, got[1], got[0])], axis)

    spec = PartitionSpec(*(None,) * axis, AXIS)
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=spec, out_specs=spec,
                         axis_names={AXIS}, check_vma=False)(x)


def _schedule(s: int, target: np.ndarray) -> tuple[list[list[tuple[int, int]]], np.ndarray, np.ndarray]:
    """Split the 2S chunk moves in two permutes, each sending one chunk from and to every shard: colour the moves
    so that a shard's two outgoing moves differ, and its two incoming ones (an alternating walk around each cycle
    of the moves, which alternate between source and destination shards). Per permute: its (source, destination)
    pairs, the half each shard sends, the half each shard's arrival goes to."""
    dest = target // 2
    colour = np.full(2 * s, -1)
    for start in range(2 * s):
        move = start
        while colour[move] < 0:
            colour[move] = 0
            twin = next(q for q in range(2 * s) if q != move and dest[q] == dest[move])  # same destination
            colour[twin] = 1
            move = twin ^ 1  # the other chunk of twin's source shard
    send, land = np.zeros((2, s), np.int32), np.zeros((2, s), np.int32)
    perms: list[list[tuple[int, int]]] = [[], []]
    for p in range(2 * s):
        c = colour[p]
        perms[c].append((p // 2, int(dest[p])))
        send[c, p // 2], land[c, dest[p]] = p % 2, target[p] % 2
    return perms, send, land
