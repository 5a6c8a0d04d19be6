"""Blockwise attention (flash-attention-2 style) with the Molmo2 mask built per tile from per-token vectors.

The forward pass runs an online softmax over KV tiles for each query tile and keeps only the output and the
log-sum-exp; the backward pass (a `jax.custom_vjp`) recomputes each tile's probabilities from them. No `[T, S]`
array exists: each tile's mask comes from the `MaskInfo` vectors sliced to the tile, and a tile with no allowed
(query, key) pair in the whole batch is skipped (`lax.cond`), so causal attention does about half the work.
Grouped-query heads share their K/V tile: the group is folded into the query rows, K/V are never repeated.

`attention` picks this path or the dense reference (`layers.dot_product_attention`) by the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.layers import MaskInfo, dot_product_attention

# Key length from which `attention="auto"` runs blockwise. Measured on XLA:CPU (bench/bench_attention.py):
# below it the dense path is as fast or faster and its [T, S] logits are small.
BLOCKWISE_MIN_KEYS = 1024


def uses_blockwise(impl: str, num_keys: int) -> bool:
    """Whether attention over `num_keys` keys runs blockwise under the config choice `impl`."""
    return impl == "blockwise" or (impl == "auto" and num_keys >= BLOCKWISE_MIN_KEYS)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None, config: Molmo2Config) -> jax.Array:
    """q `[B, T, H, D]`, k/v `[B, S, KV, D]`, mask vectors or None (every key allowed) -> `[B, T, H, D]`, by the
    path `config.attention` chooses for S keys."""
    if uses_blockwise(config.attention, k.shape[1]):
        return blockwise_attention(q, k, v, mask, block_q=config.attention_block_q,
                                   block_kv=config.attention_block_kv)
    return dot_product_attention(q, k, v, None if mask is None else mask.allowed())


def tile_size(length: int, block: int) -> int:
    """The tile for `length` rows given the largest tile `block` (a multiple of 8): as many tiles as `block`
    needs, evenly sized and rounded up to 8 rows, so little is padded (729 ViT patches with block 512: two tiles
    of 368, not 512). A length below one tile is one tile (a decode step's single query is not padded)."""
    even = -(-length // -(-length // block))
    return min(length, -(-even // 8) * 8)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None, *, block_q: int,
                        block_kv: int) -> jax.Array:
    """Same result as `dot_product_attention(q, k, v, mask.allowed())` (zeros for rows with no allowed key)."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if mask is None:  # every real key allowed: one segment, no order
        ones, zeros = jnp.ones((1, t), jnp.int32), jnp.zeros((1, t), jnp.int32)
        k_ones, k_zeros = jnp.ones((1, s), jnp.int32), jnp.zeros((1, s), jnp.int32)
        mask = MaskInfo(ones, zeros, zeros.astype(bool), k_ones, k_zeros, k_zeros.astype(bool))
    bq, bk = tile_size(t, block_q), tile_size(s, block_kv)
    nq, nk = -(-t // bq), -(-s // bk)

    def tiles(x, n, tile, fill):  # [B', L, ...] -> [n, B', tile, ...], padded with `fill`
        x = jnp.pad(x, [(0, 0), (0, n * tile - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], n, tile, *x.shape[2:]), 1, 0)

    # Padded queries get segment -1 and padded keys segment 0: neither is allowed anything.
    q_vecs = (tiles(mask.q_seg, nq, bq, -1), tiles(mask.q_idx, nq, bq, 0), tiles(mask.q_mm, nq, bq, False))
    k_vecs = (tiles(mask.k_seg, nk, bk, 0), tiles(mask.k_idx, nk, bk, 0), tiles(mask.k_mm, nk, bk, False))
    # q [B, T, H, D] -> [nq, B, KV, group * bq, D] (heads of one group next to each other's rows)
    qt = tiles(q.reshape(b, t, kv, h // kv, d), nq, bq, 0)  # [nq, B, bq, KV, G, D]
    qt = qt.transpose(0, 1, 3, 4, 2, 5).reshape(nq, b, kv, h // kv * bq, d)
    kt, vt = (tiles(x, nk, bk, 0).transpose(0, 1, 3, 2, 4) for x in (k, v))  # [nk, B, KV, bk, D]
    out = _flash(qt, kt, vt, q_vecs, k_vecs)
    out = out.reshape(nq, b, kv, h // kv, bq, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, d)
    return out[:, :t]


def _tile_mask(q_vecs, k_vecs, group: int) -> jax.Array:
    """Allowed `[B', 1, group * bq, bk]` for one tile pair, rows ordered like the folded query rows."""
    allowed = MaskInfo(*q_vecs, *k_vecs).allowed()  # [B', 1, bq, bk]
    return jnp.tile(allowed, (1, 1, group, 1))


def _logits(q, k):
    return jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)


@jax.custom_vjp
def _flash(q, k, v, q_vecs, k_vecs):
    return _flash_forward(q, k, v, q_vecs, k_vecs)[0]


def _flash_forward(q, k, v, q_vecs, k_vecs):
    """q `[nq, B, KV, Q, D]` (Q = group * bq), k/v `[nk, B, KV, bk, D]` -> out like q, lse `[nq, B, KV, Q]`."""
    group = q.shape[3] // q_vecs[0].shape[2]

    def query_tile(args):
        q_t, qv = args

        def key_tile(carry, kargs):
            k_t, v_t, kv_ = kargs
            allowed = _tile_mask(qv, kv_, group)

            def update(carry):
                m, l, acc = carry
                s = jnp.where(allowed, _logits(q_t, k_t), -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                acc = acc * correction[..., None] + jnp.einsum("bkqs,bksd->bkqd", p.astype(v_t.dtype), v_t,
                                                               preferred_element_type=jnp.float32)
                return m_new, l * correction + p.sum(-1), acc

            return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

        rows = q_t.shape[:-1]
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros(q_t.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_tile, init, (k, v, k_vecs))
        out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q_t.dtype)
        return out, jnp.where(l > 0, m + jnp.log(l), jnp.inf)  # lse = inf: a row with nothing allowed

    return jax.lax.map(query_tile, (q, q_vecs))


def _flash_fwd(q, k, v, q_vecs, k_vecs):
    out, lse = _flash_forward(q, k, v, q_vecs, k_vecs)
    return out, (q, k, v, q_vecs, k_vecs, out, lse)


def _flash_bwd(res, d_out):
    """Flash-attention-2 backward: for each KV tile, loop over query tiles, recompute the probabilities from the
    saved log-sum-exp, accumulate dK and dV for the tile and add each query tile's dQ into the carried total."""
    q, k, v, q_vecs, k_vecs, out, lse = res
    group = q.shape[3] // q_vecs[0].shape[2]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # rowsum(dO * O) [nq, B, KV, Q]
    scale = q.shape[-1] ** -0.5

    def key_tile(dq, kargs):
        k_t, v_t, kv_ = kargs

        def query_tile(carry, qargs):
            q_t, do_t, lse_t, delta_t, qv = qargs
            allowed = _tile_mask(qv, kv_, group)

            def grads(carry):
                dk, dv = carry
                p = jnp.where(allowed, jnp.exp(_logits(q_t, k_t) - lse_t[..., None]), 0.0)
                dv = dv + jnp.einsum("bkqs,bkqd->bksd", p.astype(do_t.dtype), do_t,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkqd,bksd->bkqs", do_t, v_t, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_t[..., None]) * scale).astype(q_t.dtype)
                dk = dk + jnp.einsum("bkqs,bkqd->bksd", ds, q_t, preferred_element_type=jnp.float32)
                return (dk, dv), jnp.einsum("bkqs,bksd->bkqd", ds, k_t, preferred_element_type=jnp.float32)

            skip = lambda carry: (carry, jnp.zeros(q_t.shape, jnp.float32))
            return jax.lax.cond(jnp.any(allowed), grads, skip, carry)

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        (dk, dv), dq_tiles = jax.lax.scan(query_tile, (zeros, zeros), (q, d_out, lse, delta, q_vecs))
        return dq + dq_tiles, (dk.astype(k_t.dtype), dv.astype(v_t.dtype))

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), (k, v, k_vecs))
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
