"""The KV cache of generation and attention over it.

One buffer per layer, `[B, KV, S, head_dim]` (a slot's keys for one head are contiguous, so a chunk of slots is
one strided read and the grouped query heads need no repeat or transpose). The prompt's keys/values fill slots
`[0, T)` once; each decode step writes its slot in place (`dynamic_update_slice` on the buffer the decode loop
carries) and attends only the filled prefix with an online softmax: `CHUNK` slots at a time, then the rest in
`TAIL_CHUNK`s, so a step costs the same whatever the cache's size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from molmo2_jax.sharding import fitting_spec

# Slots read per step of the online softmax: large enough that the loop overhead is small next to the
# matrix-vector work (measured on XLA:CPU, bench/bench_generation.py --slots). The filled slots past the last
# whole CHUNK are read TAIL_CHUNK at a time, so that a short fill does not read much of the empty end (one
# 256-slot read of a 104-slot fill made an 80M model's batch-8 step ~20% slower than a 128-slot cache's).
CHUNK = 256
TAIL_CHUNK = 64


class Cache(NamedTuple):
    """k/v: one `[B, KV, S, hd]` buffer per layer; seg `[B, S]` (0 at padding and empty slots); index: slots
    filled (every row alike, prompts are left padded); next_position `[B]`: the RoPE position of the next
    token of each row."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    seg: jax.Array
    index: jax.Array
    next_position: jax.Array


class LayerCache(NamedTuple):
    """What one layer reads and writes in a decode step: its buffers, the slots' segments (the new tokens'
    slots already set) and where the new tokens go."""

    k: jax.Array
    v: jax.Array
    seg: jax.Array
    index: jax.Array


def from_prompt(k: jax.Array, v: jax.Array, seg: jax.Array, next_position: jax.Array, slots: int) -> Cache:
    """A cache of `slots` slots holding a prompt's keys/values `[layers, B, T, KV, hd]` in its first T slots."""
    t = k.shape[2]
    pad = [(0, 0), (0, 0), (0, slots - t), (0, 0)]
    buffers = lambda x: tuple(jnp.pad(layer.transpose(0, 2, 1, 3), pad) for layer in x)
    return Cache(buffers(k), buffers(v), jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, slots - t)]),
                 jnp.int32(t), next_position.astype(jnp.int32))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache) -> tuple[jax.Array, tuple]:
    """Write the new keys/values `[B, T, KV, hd]` at `cache.index` and attend q `[B, T, H, hd]` causally over
    the filled slots; `[B, T, H, hd]` and the layer's updated buffers."""
    b, t, h, d = q.shape
    kv, slots = cache.k.shape[1], cache.k.shape[2]
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x.transpose(0, 2, 1, 3).astype(buf.dtype),
                                                      (0, 0, cache.index, 0))
    k_buf, v_buf = put(cache.k, k), put(cache.v, v)
    # query row g * t + i of a group is query i under head g: [B, KV, G * T, hd]
    qg = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, h // kv * t, d)
    q_slot = jnp.tile(cache.index + jnp.arange(t), h // kv)  # [G * T]

    def read(first, chunk, carry):  # the online softmax over `chunk` slots from slot `first`
        m, l, acc = carry
        # a chunk may be clamped to the buffer's end: its slots before `first` were read already
        start = jnp.minimum(first, slots - chunk)
        k_c = jax.lax.dynamic_slice_in_dim(k_buf, start, chunk, axis=2).astype(q.dtype)
        v_c = jax.lax.dynamic_slice_in_dim(v_buf, start, chunk, axis=2).astype(q.dtype)
        slot = start + jnp.arange(chunk)
        seg = jax.lax.dynamic_slice_in_dim(cache.seg, start, chunk, axis=1)
        allowed = ((seg > 0)[:, None, None, :] & (slot >= first)[None, None, None, :]
                   & (slot[None, :] <= q_slot[:, None])[None, None])
        s = jnp.einsum("bkqd,bksd->bkqs", qg, k_c, preferred_element_type=jnp.float32) * d ** -0.5
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m - m_safe)
        acc = acc * correction[..., None] + jnp.einsum("bkqs,bksd->bkqd", p.astype(v_c.dtype), v_c,
                                                       preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(-1), acc

    rows = (b, kv, h // kv * t)
    init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros((*rows, d), jnp.float32))
    filled = cache.index + t
    chunk, tail = min(CHUNK, slots), min(TAIL_CHUNK, slots)
    whole = filled // chunk
    carry = jax.lax.fori_loop(0, whole, lambda c, carry: read(c * chunk, chunk, carry), init)
    _, l, acc = jax.lax.fori_loop(0, (filled - whole * chunk + tail - 1) // tail,
                                  lambda c, carry: read(whole * chunk + c * tail, tail, carry), carry)
    out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)
    out = out.reshape(b, kv, h // kv, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return out, (k_buf, v_buf)


def shardings(config, mesh: Mesh, batch: int, max_length: int) -> Cache:
    """Shardings of a `Cache` of `max_length` slots: each layer's k/v `[B, KV, S, hd]` over
    cache_batch / cache_heads / cache_length; mesh axes that do not divide a dim are left out."""
    t = config.text
    kv = NamedSharding(mesh, fitting_spec(mesh, ("cache_batch", "cache_heads", "cache_length", "head_dim"),
                                          (batch, t.num_kv_heads, max_length, t.head_dim)))
    per_slot = NamedSharding(mesh, fitting_spec(mesh, ("cache_batch", "cache_length"), (batch, max_length)))
    return Cache(k=(kv,) * t.num_layers, v=(kv,) * t.num_layers, seg=per_slot,
                 index=NamedSharding(mesh, PartitionSpec()),
                 next_position=NamedSharding(mesh, fitting_spec(mesh, ("cache_batch",), (batch,))))
