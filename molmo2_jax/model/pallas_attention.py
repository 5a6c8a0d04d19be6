"""A Pallas TPU attention kernel for the Molmo2 mask, which skips the KV tiles the mask rules out.

The mask is `layers.MaskInfo`'s: same segment AND (causal OR both tokens visual). Splash attention cannot take
it (its masks are static numpy arrays; here the visual blocks move with every batch), so the kernel builds each
tile's mask from the per-token vectors, and the work list comes from per-tile summaries of the same vectors,
computed by XLA ahead of the kernel and handed to it as scalar-prefetched tables:

- `tiles[b, i, j]`: the j-th KV tile query tile i visits (possible tiles first; the rest repeat the last one, so
  the pipeline issues no new copy for them);
- `kinds[b, i, j]`: 0 skip, 1 partial (mask the tile), 2 full (every pair allowed: no mask arithmetic).

Grid `(batch, heads, query tiles, KV steps)`; an online softmax over the steps in VMEM scratch. The backward pass
is the blockwise path's (`attention.blockwise_attention`'s flash-attention-2 VJP, recomputing its forward), so
gradients match the blockwise path by construction; only the forward runs in Pallas.

On a non-TPU backend the same kernel runs in Pallas interpret mode (slow: for tests). Under a mesh the kernel
runs per device in `shard_map` (a Mosaic call cannot be split by XLA): batch over data x fsdp, queries over the
sequence axis (keys, values and their vectors all-gathered over it), heads over tensor (`attention.per_device`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from molmo2_jax.model.attention import blockwise_attention, every_key, per_device
from molmo2_jax.model.layers import MaskInfo

LANES = 128  # key tiles are whole lane groups: the logits tile is [bq, bk] with bk on the lanes


def tile_rows(length: int, block: int) -> int:
    """The tile for `length` rows with tiles of at most `block` (rounded to whole lane groups of 128)."""
    block = max(LANES, block // LANES * LANES)
    return min(block, -(-length // LANES) * LANES)


def _summaries(seg, idx, mm, tile):
    """Per tile of `tile` tokens `[B, n]`: real (seg > 0) tokens' segment range, slot range, whether any/all are
    visual, whether all are real."""
    b, length = seg.shape
    seg, idx, mm = (x.reshape(b, length // tile, tile) for x in (seg, idx, mm))
    real = seg > 0
    top, bottom = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    return dict(seg_lo=jnp.where(real, seg, top).min(-1), seg_hi=jnp.where(real, seg, bottom).max(-1),
                idx_lo=jnp.where(real, idx, top).min(-1), idx_hi=jnp.where(real, idx, bottom).max(-1),
                any_mm=(real & mm).any(-1), all_mm=(~real | mm).all(-1), all_real=real.all(-1))


def tile_plan(mask: MaskInfo, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """`tiles`, `kinds` `[B, nq, nk]` int32 (see the module doc) for vectors padded to whole tiles.

    A tile is possible when some pair in it may be allowed, judged from the summaries (a superset: a possible
    tile with nothing allowed is computed and fully masked); full when every pair is surely allowed."""
    q, k = _summaries(mask.q_seg, mask.q_idx, mask.q_mm, bq), _summaries(mask.k_seg, mask.k_idx, mask.k_mm, bk)
    q, k = {n: x[:, :, None] for n, x in q.items()}, {n: x[:, None, :] for n, x in k.items()}
    overlap = (q["seg_lo"] <= k["seg_hi"]) & (k["seg_lo"] <= q["seg_hi"])
    possible = overlap & ((k["idx_lo"] <= q["idx_hi"]) | (q["any_mm"] & k["any_mm"]))
    one_segment = (q["seg_lo"] == q["seg_hi"]) & (k["seg_lo"] == k["seg_hi"]) & (q["seg_lo"] == k["seg_lo"])
    full = (q["all_real"] & k["all_real"] & one_segment
            & ((k["idx_hi"] <= q["idx_lo"]) | (q["all_mm"] & k["all_mm"])))
    order = jnp.argsort(~possible, axis=-1, stable=True).astype(jnp.int32)  # possible tiles first, in order
    count = possible.sum(-1, keepdims=True)
    step = jnp.arange(possible.shape[-1])
    tiles = jnp.take_along_axis(order, jnp.clip(jnp.minimum(step, count - 1), 0), -1)
    kinds = jnp.where(step < count, 1 + jnp.take_along_axis(full, tiles, -1), 0).astype(jnp.int32)
    return tiles, kinds


def skipped_fraction(mask: MaskInfo, block_q: int = 512, block_kv: int = 512) -> tuple[float, float]:
    """(skipped, full) fractions of the `[nq, nk]` tile grid the kernel would see for `mask` (numpy in, floats
    out), for reports and tests."""
    bq, bk = tile_rows(mask.q_seg.shape[1], block_q), tile_rows(mask.k_seg.shape[1], block_kv)
    _, kinds = tile_plan(_pad_mask(mask, bq, bk), bq, bk)
    kinds = np.asarray(kinds)
    return float((kinds == 0).mean()), float((kinds == 2).mean())


def _pad_mask(mask: MaskInfo, bq: int, bk: int) -> MaskInfo:
    """Vectors padded to whole tiles: padded queries segment -1, padded keys segment 0 (nothing allowed)."""
    pad = lambda x, tile, fill: jnp.pad(x, [(0, 0), (0, -x.shape[1] % tile)], constant_values=fill)
    return MaskInfo(pad(mask.q_seg, bq, -1), pad(mask.q_idx, bq, 0), pad(mask.q_mm, bq, False),
                    pad(mask.k_seg, bk, 0), pad(mask.k_idx, bk, 0), pad(mask.k_mm, bk, False))


# ----------------------------------------------------------------------------------------------------
# The kernel


def _kernel(tiles_ref, kinds_ref, q_ref, k_ref, v_ref, qv_ref, kv_ref, o_ref, m_scr, l_scr, acc_scr):
    """One (example, head, query tile, KV step): q `[bq, D]`, k/v `[bk, D]`, qv `[bq, 3]` and kv `[3, bk]` the
    (segment, slot, visual) vectors; scratch m/l `[bq, 1]`, acc `[bq, D]` float32."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)
    kind = kinds_ref[(b * nq + i) * nk + j]

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(masked: bool):
        q, k = q_ref[...], k_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (q.shape[-1] ** -0.5)
        if masked:
            qv, kv = qv_ref[...], kv_ref[...]
            same = (kv[0:1, :] == qv[:, 0:1]) & (kv[0:1, :] > 0)
            allowed = same & ((kv[1:2, :] <= qv[:, 1:2]) | ((qv[:, 2:3] > 0) & (kv[2:3, :] > 0)))
            s = jnp.where(allowed, s, -jnp.inf)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
        p = jnp.exp(s - m_safe)
        correction = jnp.exp(m_prev - m_safe)
        l_scr[...] = l_scr[...] * correction + p.sum(-1, keepdims=True)
        acc_scr[...] = acc_scr[...] * correction + jax.lax.dot_general(
            p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_scr[...] = m_new

    pl.when(kind == 1)(lambda: update(True))
    pl.when(kind == 2)(lambda: update(False))

    @pl.when(j == nk - 1)
    def _():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _forward(q, k, v, mask: MaskInfo | None, block_q: int, block_kv: int, interpret: bool):
    """The kernel's output for q `[B, T, H, D]`, k/v `[B, S, KV, D]` (one device's shard; mask None: every key)."""
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = h // kv_heads
    bq, bk = tile_rows(t, block_q), tile_rows(s, block_kv)
    mask = _pad_mask(every_key(q, k) if mask is None else mask, bq, bk)
    tp, sp = mask.q_seg.shape[1], mask.k_seg.shape[1]
    nq, nk = tp // bq, sp // bk
    tiles, kinds = tile_plan(mask, bq, bk)
    qh = jnp.pad(q, [(0, 0), (0, tp - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)  # [B, H, Tp, D]
    kh, vh = (jnp.pad(x, [(0, 0), (0, sp - s), (0, 0), (0, 0)]).transpose(0, 2, 1, 3) for x in (k, v))
    qv = jnp.stack([mask.q_seg, mask.q_idx, mask.q_mm.astype(jnp.int32)], -1).astype(jnp.int32)  # [B, Tp, 3]
    kv = jnp.stack([mask.k_seg, mask.k_idx, mask.k_mm.astype(jnp.int32)], 1).astype(jnp.int32)  # [B, 3, Sp]

    kv_tile = lambda b_, i, j, tiles_, _: tiles_[(b_ * nq + i) * nk + j]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, h, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
            pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j, *t_: (b_, h_ // group, kv_tile(b_, i, j, *t_), 0)),
            pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j, *t_: (b_, h_ // group, kv_tile(b_, i, j, *t_), 0)),
            pl.BlockSpec((None, bq, 3), lambda b_, h_, i, j, *_: (b_, i, 0)),
            pl.BlockSpec((None, 3, bk), lambda b_, h_, i, j, *t_: (b_, 0, kv_tile(b_, i, j, *t_))),
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)])
    out = pl.pallas_call(
        _kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="molmo2_attention",
    )(tiles.reshape(-1), kinds.reshape(-1), qh, kh, vh, qv, kv)
    return out.transpose(0, 2, 1, 3)[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, mask, block_q, block_kv, interpret):
    return _forward(q, k, v, mask, block_q, block_kv, interpret)


def _attend_fwd(q, k, v, mask, block_q, block_kv, interpret):
    return _forward(q, k, v, mask, block_q, block_kv, interpret), (q, k, v, mask)


def _attend_bwd(block_q, block_kv, interpret, residuals, d_out):
    q, k, v, mask = residuals
    _, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv), q, k, v)
    return (*vjp(d_out), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _on_device(q, k, v, mask, block_q, block_kv):
    """Mosaic on TPU, interpret mode elsewhere: chosen when lowering for a platform, so an ahead-of-time compile
    for a TPU topology from a CPU host takes the kernel."""
    return jax.lax.platform_dependent(
        q, k, v, mask,
        tpu=lambda *a: _attend(*a, block_q, block_kv, False),
        default=lambda *a: _attend(*a, block_q, block_kv, True))


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo | None, *, block_q: int,
                     block_kv: int, zigzag: bool = False) -> jax.Array:
    """Same result as `attention.blockwise_attention` (q `[B, T, H, D]`, k/v `[B, S, KV, D]`); `zigzag` as
    `attention.per_device`'s `zigzag_order`."""
    return per_device(functools.partial(_on_device, block_q=block_q, block_kv=block_kv), q, k, v, mask, zigzag)
