"""Blockwise attention (flash-attention-2 style) with the Molmo2 mask built per tile from per-token vectors.

The forward pass runs an online softmax over KV tiles for each query tile and keeps only the output and the
log-sum-exp; the backward pass (a `jax.custom_vjp`) recomputes each tile's probabilities from them. No `[T, S]`
array exists: each tile's mask comes from the `MaskInfo` vectors sliced to the tile, and each query tile loops
only over the range of key tiles that may hold an allowed pair (from per-tile summaries of the vectors), so causal
attention does about half the work and a decode step skips the empty end of the cache.
Grouped-query heads share their K/V tile: the group is folded into the query rows, K/V are never repeated.

`attention` picks this path or the dense reference (`layers.dot_product_attention`) by the config. Under a mesh
both kernels (this one and `pallas_attention`) run per device in `shard_map` (`per_device`): XLA cannot split
their tile loops, and with the `sequence` axis split this is the context-parallel form (local queries, keys,
values and key vectors all-gathered over `sequence`; the mask's slot vectors carry global positions, so the
local queries need no offset).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model import zigzag
from molmo2_jax.model.layers import MaskInfo, dot_product_attention
from molmo2_jax.sharding import fitting_spec

# Key length from which `attention="auto"` runs blockwise. Measured on XLA:CPU (bench/bench_attention.py, the
# blockwise prefill looping over (batch row, KV head) pairs): below 128 keys dense is as fast or faster; from 128
# on blockwise wins (forward and forward+backward 1.2-5x at 256, 1.2-4x for the ViT's 729 keys). The connector's
# pooling windows (a few keys) stay dense.
BLOCKWISE_MIN_KEYS = 128


def uses_blockwise(impl: str, num_keys: int) -> bool:
    """Whether attention over `num_keys` keys runs blockwise under the config choice `impl`."""
    return impl == "blockwise" or (impl in ("auto", "pallas") and num_keys >= BLOCKWISE_MIN_KEYS)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None, config: Molmo2Config) -> jax.Array:
    """q `[B, T, H, D]`, k/v `[B, S, KV, D]`, mask vectors or None (every key allowed) -> `[B, T, H, D]`, by the
    path `config.attention` chooses for S keys."""
    zigzag_order = mask is not None and config.context_balance == "zigzag"  # tokens as `Molmo2.__call__` orders them
    if config.attention == "pallas" and uses_blockwise("pallas", k.shape[1]):  # the kernel where blockwise would run
        from molmo2_jax.model.pallas_attention import pallas_attention  # imports this module

        return pallas_attention(q, k, v, mask, block_q=config.attention_block_q, block_kv=config.attention_block_kv,
                                zigzag=zigzag_order)
    if uses_blockwise(config.attention, k.shape[1]):
        attend = functools.partial(blockwise_attention, block_q=config.attention_block_q,
                                   block_kv=config.attention_block_kv)
        return per_device(attend, q, k, v, mask, zigzag_order)
    return dot_product_attention(q, k, v, None if mask is None else mask.allowed())


def every_key(q: jax.Array, k: jax.Array) -> MaskInfo:
    """Mask vectors allowing every key (one segment, every pair visual): the ViT's attention."""
    ones_q, ones_k = jnp.ones(q.shape[:2], jnp.int32), jnp.ones(k.shape[:2], jnp.int32)
    return MaskInfo(ones_q, ones_q, ones_q.astype(bool), ones_k, ones_k, ones_k.astype(bool))


def per_device(attend, q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None,
               zigzag_order: bool = False) -> jax.Array:
    """`attend(q, k, v, mask)` (a kernel with `blockwise_attention`'s contract; mask None: every key) run per
    device under the current mesh in `shard_map`, or directly without one.

    Rows over data x fsdp (the ViT's crops by its own rule, which may add `sequence`), heads over tensor, queries
    over `sequence` where it divides their length. When queries are split and it divides the key length too, K, V
    and the key vectors come in split alike and are all-gathered over `sequence` inside (context parallelism; their
    gradients are reduce-scattered back); otherwise keys are whole on every device. `zigzag_order`: the tokens
    may be in zigzag order (where `zigzag.shards` says so); the gathered keys are then put back in natural order,
    so a query tile's allowed key tiles stay one contiguous range.
    """
    rows, length = ("act_crops", "act_patches") if mask is None else ("act_batch", "act_length")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(q, k, v, mask)
    q_spec = fitting_spec(mesh, (rows, length, "act_heads", None), q.shape)
    axis = q_spec[1]  # the mesh axis splitting the queries, or None
    split = axis is not None and k.shape[1] % mesh.shape[axis] == 0
    zigzag_shards = zigzag.shards(k.shape[1]) if zigzag_order and split else 0
    kv_spec = fitting_spec(mesh, (rows, length if split else None, "act_kv_heads", None), k.shape)
    if kv_spec[2] != q_spec[2]:  # heads and kv heads must split alike, or a device's groups would not match
        q_spec, kv_spec = (PartitionSpec(*x[:2], None, None) for x in (q_spec, kv_spec))
    q_vec, k_vec = PartitionSpec(*q_spec[:2]), PartitionSpec(*kv_spec[:2])

    def local(q, k, v, *vecs):  # vecs: (mask,) or () for None
        mask = vecs[0] if vecs else None
        if split:
            def gather(x):
                x = jax.lax.all_gather(x, axis, axis=1, tiled=True)
                return zigzag.natural_keys(x, zigzag_shards) if zigzag_shards else x

            k, v = gather(k), gather(v)
            if mask is not None:
                mask = mask._replace(k_seg=gather(mask.k_seg), k_idx=gather(mask.k_idx), k_mm=gather(mask.k_mm))
        return attend(q, k, v, mask)

    vecs, vec_specs = ((), ()) if mask is None else ((mask,), (MaskInfo(q_vec, q_vec, q_vec, k_vec, k_vec, k_vec),))
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *vec_specs), out_specs=q_spec,
                         check_vma=False)(q, k, v, *vecs)


def tile_size(length: int, block: int) -> int:
    """The tile for `length` rows given the largest tile `block` (a multiple of 8): as many tiles as `block`
    needs, evenly sized and rounded up to 8 rows, so little is padded (729 ViT patches with block 512: two tiles
    of 368, not 512). A length below one tile is one tile (a decode step's single query is not padded)."""
    even = -(-length // -(-length // block))
    return min(length, -(-even // 8) * 8)


# Largest `[group * T, S]` fp32 logits of one (batch row, KV head) pair that unmasked attention (the ViT's)
# computes as a single tile, whatever the blocks. Without a mask no tile is ever skipped, so tiles only bound the
# logits' size, and one tile runs no online softmax (no rescaling, no loop over key tiles) and pads nothing.
# Measured on XLA:CPU (one process, CPU time, min of 13): the ViT's `[5, 729, 6, 64]` in one 729 x 729 tile (2 MiB
# of logits, in L3) 63 ms against 82 ms as 2 x 2 tiles of 368 (blocks 512), torch SDPA 63 ms; `[5, 1024, 6, 64]`
# as one tile 117 ms against 139 ms as 2 x 2 tiles of 512. Masked attention keeps its tiles: they let it skip
# what the mask rules out (causal halves, the empty end of a cache).
ONE_TILE_ELEMENTS = 1024 * 1024


def tile_shape(queries: int, keys: int, group: int, block_q: int, block_kv: int,
               masked: bool = True) -> tuple[int, int]:
    """(query tile, key tile) rows for `queries` x `keys` attention with `group` query heads per KV head: both
    whole when unmasked and their logits fit `ONE_TILE_ELEMENTS`, else `tile_size` of each with its block."""
    if not masked and group * queries * keys <= ONE_TILE_ELEMENTS:
        return queries, keys
    return tile_size(queries, block_q), tile_size(keys, block_kv)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None, *, block_q: int,
                        block_kv: int) -> jax.Array:
    """Same result as `dot_product_attention(q, k, v, mask.allowed())` (zeros for rows with no allowed key).
    mask None: every key allowed, and no mask is built where no key is padded."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    group = h // kv
    bq, bk = tile_shape(t, s, group, block_q, block_kv, masked=mask is not None)
    nq, nk = -(-t // bq), -(-s // bk)

    def tiles(x, n, tile, fill):  # [B', L, ...] -> [B', n, tile, ...], padded with `fill`
        x = jnp.pad(x, [(0, 0), (0, n * tile - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(x.shape[0], n, tile, *x.shape[2:])

    if mask is None and s % bk:  # padded keys must be masked (vectors of one row, shared by all)
        mask = every_key(q[:1], k[:1])
    # Padded queries get segment -1 and padded keys segment 0: neither is allowed anything.
    q_vecs = None if mask is None else (
        tiles(mask.q_seg, nq, bq, -1), tiles(mask.q_idx, nq, bq, 0), tiles(mask.q_mm, nq, bq, False))
    k_vecs = None if mask is None else (
        tiles(mask.k_seg, nk, bk, 0), tiles(mask.k_idx, nk, bk, 0), tiles(mask.k_mm, nk, bk, False))
    # q [B, T, H, D] -> [B, KV, nq, group * bq, D]: row g * bq + i of a tile is query i under head g of the group
    qt = tiles(q.reshape(b, t, kv, group, d), nq, bq, 0).transpose(0, 3, 1, 4, 2, 5).reshape(b, kv, nq, -1, d)
    kt, vt = (tiles(x, nk, bk, 0).transpose(0, 3, 1, 2, 4) for x in (k, v))  # [B, KV, nk, bk, D]
    if t == 1:  # a decode step: one pass whose tile products are batched over B and the KV heads
        lead = lambda x: jnp.moveaxis(x, 2, 0)  # tiles first: [n, B, KV, ...]
        vecs = lambda x: None if x is None else tuple(jnp.moveaxis(y, 1, 0) for y in x)
        out = jnp.moveaxis(_flash(lead(qt), lead(kt), lead(vt), vecs(q_vecs), vecs(k_vecs),
                                  _ranges(vecs(q_vecs), vecs(k_vecs), nq, nk), group), 0, 2)
    else:
        out = _per_pair(qt, kt, vt, q_vecs, k_vecs, group)
    out = out.reshape(b, kv, nq, group, bq, d).transpose(0, 2, 4, 1, 3, 5).reshape(b, nq * bq, h, d)
    return out[:, :t]


# A loop step of `_per_pair` takes as many KV heads of one batch row as keep its fp32 logits (`heads * Q * bk`)
# within this: products batched over a few heads keep both cores busy without streaming large logits through memory.
# Measured on XLA:CPU (min of 7, forward + backward): the ViT's `[5, 729, 6, 64]` 169 ms a head at a time, 133 ms
# two at a time, 137 three, 146 all six; the decoder's causal `[1, 774, 12 / 4, 64]` 59 ms a head, 55 two, 47 four.
# This bound gives the ViT three heads a step (729 x 729 logits each) and that decoder all four (1176 x 392 each).
STEP_LOGITS_ELEMENTS = 2 * 1024 * 1024


def _per_pair(qt, kt, vt, q_vecs, k_vecs, group: int) -> jax.Array:
    """`_flash` run by a loop over (batch row, KV heads) pairs, each with 2-D tile products batched over a few KV
    heads of the row (`STEP_LOGITS_ELEMENTS`): on XLA:CPU this is 3-8x faster than products batched over all of B
    and KV (bench/bench_attention.py), whose operands and `[B, KV, Q, bk]` logits stream through memory instead of
    staying in cache. Its ranges are the row's own.

    q `[B, KV, nq, Q, D]`, k/v `[B, KV, nk, bk, D]`, vectors `[B' (B or 1), n, tile]` -> out like q."""
    b, kv, nq, rows, d = qt.shape
    nk, bk = kt.shape[2:4]
    heads = max(g for g in range(1, kv + 1) if kv % g == 0 and (g == 1 or g * rows * bk <= STEP_LOGITS_ELEMENTS))

    def pair(args):
        qp, kp, vp, qv, kv_ = args  # q [heads, nq * Q, D], k/v [heads, nk * bk, D], vectors [n, tile]
        if qv is not None:
            qv, kv_ = tuple(x[:, None] for x in qv), tuple(x[:, None] for x in kv_)
        tiled = lambda x, n: x.reshape(heads, n, -1, d).transpose(1, 0, 2, 3)[:, None]  # [n, 1 row, heads, rows, D]
        qp, kp, vp = tiled(qp, nq), tiled(kp, nk), tiled(vp, nk)
        out = _flash(qp, kp, vp, qv, kv_, _ranges(qv, kv_, nq, nk), group)
        return out[:, 0].transpose(1, 0, 2, 3).reshape(heads, -1, d)

    # tiles flattened into the rows: a `[B*KV, 1, ...]` loop input of one tile got a transposed layout on XLA:CPU
    # (then copied again for the loop)
    fold = lambda x: x.reshape(b * kv // heads, heads, -1, d)
    per_pair = lambda vecs: None if vecs is None else tuple(  # [B', n, tile] -> [B * KV / heads, n, tile]
        jnp.broadcast_to(x[:, None], (b, kv // heads, *x.shape[1:])).reshape(b * kv // heads, *x.shape[1:])
        for x in vecs)
    out = jax.lax.map(pair, (fold(qt), fold(kt), fold(vt), per_pair(q_vecs), per_pair(k_vecs)))
    return out.reshape(qt.shape)


def _tile_mask(q_vecs, k_vecs, group: int) -> jax.Array | None:
    """Allowed `[B', 1, group * bq, bk]` for one tile pair, rows ordered like the folded query rows (None: no
    vectors, every pair allowed)."""
    if q_vecs is None:
        return None
    allowed = MaskInfo(*q_vecs, *k_vecs).allowed()  # [B', 1, bq, bk]
    return jnp.tile(allowed, (1, 1, group, 1))


def _logits(q, k):
    """Scaled fp32 logits; the scale goes on q (`[Q, D]`), not on the `[Q, bk]` logits: one pass fewer over them."""
    return jnp.einsum("bkqd,bksd->bkqs", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                      preferred_element_type=jnp.float32)


def _ranges(q_vecs, k_vecs, nq: int, nk: int) -> tuple[jax.Array, ...]:
    """`tile_ranges`, or every one of the `nq` query and `nk` key tiles when there are no vectors."""
    if q_vecs is None:
        return (jnp.zeros(nq, jnp.int32), jnp.full(nq, nk, jnp.int32), jnp.zeros(nk, jnp.int32),
                jnp.full(nk, nq, jnp.int32))
    return tile_ranges(q_vecs, k_vecs)


def tile_ranges(q_vecs, k_vecs) -> tuple[jax.Array, ...]:
    """Per query tile the key tiles `[lo, hi)` that may hold an allowed pair, and per key tile the query tiles.

    Judged from per-tile summaries of the vectors (segment range, lowest key slot, highest query slot, any visual
    token), so a range is a superset: a tile inside it with nothing allowed is computed and fully masked."""
    top = jnp.iinfo(jnp.int32).max

    def summary(seg, idx, mm):  # [n, B', tile] -> [n, B'] each, over the tile's real tokens
        real = seg > 0
        return (jnp.where(real, seg, top).min(-1), jnp.where(real, seg, -1).max(-1),
                jnp.where(real, idx, top).min(-1), jnp.where(real, idx, -1).max(-1), (real & mm).any(-1))

    q_seg_lo, q_seg_hi, _, q_idx_hi, q_mm = (x[:, None] for x in summary(*q_vecs))
    k_seg_lo, k_seg_hi, k_idx_lo, _, k_mm = (x[None] for x in summary(*k_vecs))
    possible = ((q_seg_lo <= k_seg_hi) & (k_seg_lo <= q_seg_hi) & ((k_idx_lo <= q_idx_hi) | (q_mm & k_mm))).any(-1)

    def bounds(table):  # [n, m] -> first and one-past-last true column of each row (0, 0 when none)
        m, any_ = table.shape[1], table.any(1)
        return (jnp.where(any_, jnp.argmax(table, 1), 0).astype(jnp.int32),
                jnp.where(any_, m - jnp.argmax(table[:, ::-1], 1), 0).astype(jnp.int32))

    return (*bounds(possible), *bounds(possible.T))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_vecs, k_vecs, ranges, group):
    return _flash_forward(q, k, v, q_vecs, k_vecs, ranges, group)[0]


def _masked_logits(q_t, k_t, q_vecs, k_vecs, group):
    """fp32 logits of a tile pair, -inf where the vectors (None: every pair allowed) rule a pair out."""
    s, allowed = _logits(q_t, k_t), _tile_mask(q_vecs, k_vecs, group)
    return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


def _flash_forward(q, k, v, q_vecs, k_vecs, ranges, group):
    """q `[nq, B, KV, Q, D]` (Q = group * bq), k/v `[nk, B, KV, bk, D]` -> out like q, lse `[nq, B, KV, Q]`.
    Each query tile loops over its range of key tiles only; with one key tile it is a plain softmax (no online
    rescaling), whatever its range (a tile with nothing allowed gives the same zeros)."""
    k_lo, k_hi = ranges[:2]
    key_vecs = lambda j: None if k_vecs is None else tuple(x[j] for x in k_vecs)

    def query_tile(args):
        q_t, qv, lo, hi = args
        rows = q_t.shape[:-1]
        if k.shape[0] == 1:
            s = _masked_logits(q_t, k[0], qv, key_vecs(0), group)
            m = s.max(-1)
            p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
            l, acc = p.sum(-1), jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v[0],
                                           preferred_element_type=jnp.float32)
        else:
            def key_tile(j, carry):
                m, l, acc = carry
                s = _masked_logits(q_t, k[j], qv, key_vecs(j), group)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                acc = acc * correction[..., None] + jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v[j],
                                                               preferred_element_type=jnp.float32)
                return m_new, l * correction + p.sum(-1), acc

            init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                    jnp.zeros(q_t.shape, jnp.float32))
            m, l, acc = jax.lax.fori_loop(lo, hi, key_tile, init)
        out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q_t.dtype)
        return out, jnp.where(l > 0, m + jnp.log(l), jnp.inf)  # lse = inf: a row with nothing allowed

    return jax.lax.map(query_tile, (q, q_vecs, k_lo, k_hi))


def _flash_fwd(q, k, v, q_vecs, k_vecs, ranges, group):
    out, lse = _flash_forward(q, k, v, q_vecs, k_vecs, ranges, group)
    return out, (q, k, v, q_vecs, k_vecs, ranges, out, lse)


def _flash_bwd(group, res, d_out):
    """Flash-attention-2 backward: for each KV tile, loop over its range of query tiles, recompute the
    probabilities from the saved log-sum-exp, accumulate dK and dV for the tile and add each query tile's dQ into
    the carried total."""
    q, k, v, q_vecs, k_vecs, ranges, out, lse = res
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # rowsum(dO * O) [nq, B, KV, Q]
    scale = q.shape[-1] ** -0.5

    def key_tile(dq, kargs):
        k_t, v_t, kv_, lo, hi = kargs

        def query_tile(i, carry):
            dq, dk, dv = carry
            q_t, do_t = q[i], d_out[i]
            p = jnp.exp(_masked_logits(q_t, k_t, None if q_vecs is None else tuple(x[i] for x in q_vecs), kv_,
                                       group) - lse[i][..., None])
            dv = dv + jnp.einsum("bkqs,bkqd->bksd", p.astype(do_t.dtype), do_t, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqd,bksd->bkqs", do_t, v_t, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None]) * scale).astype(q_t.dtype)
            dk = dk + jnp.einsum("bkqs,bkqd->bksd", ds, q_t, preferred_element_type=jnp.float32)
            dq = dq.at[i].add(jnp.einsum("bkqs,bksd->bkqd", ds, k_t, preferred_element_type=jnp.float32))
            return dq, dk, dv

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, query_tile, (dq, zeros, zeros))
        return dq, (dk.astype(k_t.dtype), dv.astype(v_t.dtype))

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), (k, v, k_vecs, *ranges[2:]))
    return dq.astype(q.dtype), dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
