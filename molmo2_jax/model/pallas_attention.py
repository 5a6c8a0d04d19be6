"""A Pallas TPU attention kernel for the Molmo2 mask, which skips the KV tiles the mask rules out.

The mask is `layers.MaskInfo`'s: same segment AND (causal OR both tokens visual). Splash attention cannot take
it (its masks are static numpy arrays; here the visual blocks move with every batch), so the kernel builds each
tile's mask from the per-token vectors, and the work list comes from per-tile summaries of the same vectors,
computed by XLA ahead of the kernel and handed to it as scalar-prefetched tables:

- `tiles[b, i, j]`: the j-th KV tile query tile i visits (possible tiles first; the rest repeat the last one, so
  the pipeline issues no new copy for them);
- `kinds[b, i, j]`: 0 skip, 1 partial (mask the tile), 2 full (every pair allowed: no mask arithmetic).

Grid `(batch, heads, query tiles, KV steps)`; an online softmax over the steps in VMEM scratch. The forward also
writes each query row's log-sum-exp (`[B, H, 1, Tp]` fp32, one lane-dense row per head; +inf on rows with nothing
allowed), kept for the backward with q, k, v, the output and the mask vectors.

The backward is flash-attention-2 in two Pallas kernels that recompute each tile's probabilities from the
log-sum-exp (delta = rowsum(dO * O) comes from XLA):
- dQ on the forward's grid and plan, dQ accumulated in VMEM;
- dK/dV on grid `(batch, KV heads, KV tiles, steps)` with the transposed plan (`tile_plan(by_key=True)`: per KV
  tile the query tiles that may attend to it), visiting those query tiles under each head of the KV head's group
  in turn, so dK and dV sum over the group in VMEM. It works on the transposed tile (k q^T), where the stored
  log-sum-exp rows broadcast as they are.
Both skip, mask or not by the same kinds as the forward.

On a non-TPU backend the same kernel runs in Pallas interpret mode (slow: for tests). Under a mesh the kernel
runs per device in `shard_map` (a Mosaic call cannot be split by XLA): batch over data x fsdp, queries over the
sequence axis (keys, values and their vectors all-gathered over it), heads over tensor (`attention.per_device`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from molmo2_jax.model.attention import every_key, per_device
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


def tile_plan(mask: MaskInfo, bq: int, bk: int, *, by_key: bool = False) -> tuple[jax.Array, jax.Array]:
    """`tiles`, `kinds` `[B, nq, nk]` int32 (see the module doc) for vectors padded to whole tiles; `by_key`: the
    transposed plan `[B, nk, nq]`, per KV tile the query tiles that may attend to it (the dK/dV kernel's).

    A tile is possible when some pair in it may be allowed, judged from the summaries (a superset: a possible
    tile with nothing allowed is computed and fully masked); full when every pair is surely allowed."""
    q, k = _summaries(mask.q_seg, mask.q_idx, mask.q_mm, bq), _summaries(mask.k_seg, mask.k_idx, mask.k_mm, bk)
    q, k = {n: x[:, :, None] for n, x in q.items()}, {n: x[:, None, :] for n, x in k.items()}
    overlap = (q["seg_lo"] <= k["seg_hi"]) & (k["seg_lo"] <= q["seg_hi"])
    possible = overlap & ((k["idx_lo"] <= q["idx_hi"]) | (q["any_mm"] & k["any_mm"]))
    one_segment = (q["seg_lo"] == q["seg_hi"]) & (k["seg_lo"] == k["seg_hi"]) & (q["seg_lo"] == k["seg_lo"])
    full = (q["all_real"] & k["all_real"] & one_segment
            & ((k["idx_hi"] <= q["idx_lo"]) | (q["all_mm"] & k["all_mm"])))
    if by_key:
        possible, full = possible.swapaxes(1, 2), full.swapaxes(1, 2)
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
# The kernels: shared pieces


def _columns(ref):
    """(segment, slot, visual) of a `[n, 3]` vectors block, each `[n, 1]`."""
    x = ref[...]
    return x[:, 0:1], x[:, 1:2], x[:, 2:3]


def _rows(ref):
    """(segment, slot, visual) of a `[3, n]` vectors block, each `[1, n]`."""
    x = ref[...]
    return x[0:1], x[1:2], x[2:3]


def _allowed(q_vecs, k_vecs):
    """The Molmo2 mask of a tile from its query and key vectors, one side columns and the other rows (the
    backward's dK/dV kernel works on the transposed tile)."""
    (q_seg, q_idx, q_mm), (k_seg, k_idx, k_mm) = q_vecs, k_vecs
    return (k_seg == q_seg) & (k_seg > 0) & ((k_idx <= q_idx) | ((q_mm > 0) & (k_mm > 0)))


def _logits(x, y, allowed):
    """Scaled fp32 `x @ y^T`, -inf where `allowed` is false (None: a full tile, no mask arithmetic)."""
    s = jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * (x.shape[-1] ** -0.5)
    return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


def _matmul(x, y):
    """fp32 `x @ y`."""
    return jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _on_kind(kind, step):
    """`step(masked)` for a partial (1) or full (2) tile; nothing for a skipped one (0)."""
    pl.when(kind == 1)(lambda: step(True))
    pl.when(kind == 2)(lambda: step(False))


def _probs_and_dlogits(x, y, allowed, lse, dx, dy, delta):
    """The backward's recomputed probabilities `p = exp(x y^T * scale - lse)` and the logits' gradient
    `p * (dx dy^T - delta)` (unscaled). The dQ kernel passes (q, k, ..., dO, v), the dK/dV kernel the transposed
    tile (k, q, ..., v, dO), with `lse` and `delta` as columns or rows to match. lse = +inf on rows with nothing
    allowed: p = 0 there."""
    p = jnp.exp(_logits(x, y, allowed) - lse)
    dp = jax.lax.dot_general(dx, dy, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def _lse_row(m, l):
    """The log-sum-exp `[1, bq]` (lane-dense: one row) of the online softmax's m, l `[bq, 1]`; +inf where l = 0."""
    return jnp.where(l > 0, m + jnp.log(l), jnp.inf).reshape(1, -1)


def _column(ref):
    """A `[1, bq]` row block (lse, delta) as a `[bq, 1]` column."""
    return jnp.expand_dims(ref[0], -1)


# ----------------------------------------------------------------------------------------------------
# The kernels


def _forward_kernel(tiles_ref, kinds_ref, q_ref, k_ref, v_ref, qv_ref, kv_ref, o_ref, lse_ref, m_scr, l_scr,
                    acc_scr):
    """One (example, head, query tile, KV step): q `[bq, D]`, k/v `[bk, D]`, qv `[bq, 3]` and kv `[3, bk]` the
    (segment, slot, visual) vectors; out o `[bq, D]`, lse `[1, bq]`; scratch m/l `[bq, 1]`, acc `[bq, D]` fp32."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(masked: bool):
        s = _logits(q_ref[...], k_ref[...], _allowed(_columns(qv_ref), _rows(kv_ref)) if masked else None)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
        p = jnp.exp(s - m_safe)
        correction = jnp.exp(m_prev - m_safe)
        l_scr[...] = l_scr[...] * correction + p.sum(-1, keepdims=True)
        acc_scr[...] = acc_scr[...] * correction + _matmul(p.astype(v_ref.dtype), v_ref[...])
        m_scr[...] = m_new

    _on_kind(kinds_ref[(b * nq + i) * nk + j], update)

    @pl.when(j == nk - 1)
    def _():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = _lse_row(m_scr[...], l)


def _dq_kernel(tiles_ref, kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qv_ref, kv_ref, dq_ref,
               dq_scr):
    """dQ for one (example, head, query tile, KV step), the forward's grid and plan; lse/delta `[1, bq]`."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def update(masked: bool):
        k = k_ref[...]
        _, ds = _probs_and_dlogits(q_ref[...], k, _allowed(_columns(qv_ref), _rows(kv_ref)) if masked else None,
                                   _column(lse_ref), do_ref[...], v_ref[...], _column(delta_ref))
        dq_scr[...] += _matmul(ds.astype(k.dtype), k)

    _on_kind(kinds_ref[(b * nq + i) * nk + j], update)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * (q_ref.shape[-1] ** -0.5)).astype(dq_ref.dtype)


def _dkv_kernel(tiles_ref, kinds_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, kv_ref, qv_ref, dk_ref,
                dv_ref, dk_scr, dv_scr, *, nq: int):
    """dK, dV for one (example, KV head, KV tile, step): step = g * nq + n visits the n-th query tile of the
    transposed plan under head g of the group, so the group's sum happens here in the fp32 scratch (no per-query-
    head `[B, H, S, D]` gradients to reduce afterwards). Works on the transposed tile `[bk, bq]` (k q^T), where
    lse/delta `[1, bq]` are rows as stored; kv `[bk, 3]`, qv `[3, bq]` the vectors."""
    b, j, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk = pl.num_programs(2)

    @pl.when(step == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def update(masked: bool):
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dlogits(k_ref[...], q, _allowed(_rows(qv_ref), _columns(kv_ref)) if masked else None,
                                   lse_ref[...], v_ref[...], do, delta_ref[...])
        dv_scr[...] += _matmul(p.astype(do.dtype), do)
        dk_scr[...] += _matmul(ds.astype(q.dtype), q)

    _on_kind(kinds_ref[(b * nk + j) * nq + jax.lax.rem(step, nq)], update)

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * (q_ref.shape[-1] ** -0.5)).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------
# Calling them


class _Tiled(NamedTuple):
    """One device's inputs in the kernels' layout: tiles bq x bk, the padded mask and its vectors as
    `[B, Tp, 3]` / `[B, 3, Tp]` (queries) and `[B, 3, Sp]` / `[B, Sp, 3]` (keys)."""

    bq: int
    bk: int
    mask: MaskInfo
    q_cols: jax.Array
    q_rows: jax.Array
    k_rows: jax.Array
    k_cols: jax.Array

    @property
    def nq(self) -> int:
        return self.mask.q_seg.shape[1] // self.bq

    @property
    def nk(self) -> int:
        return self.mask.k_seg.shape[1] // self.bk

    @staticmethod
    def of(q, k, mask: MaskInfo | None, block_q: int, block_kv: int) -> _Tiled:
        bq, bk = tile_rows(q.shape[1], block_q), tile_rows(k.shape[1], block_kv)
        mask = _pad_mask(every_key(q, k) if mask is None else mask, bq, bk)
        stack = lambda seg, idx, mm, axis: jnp.stack([seg, idx, mm.astype(jnp.int32)], axis).astype(jnp.int32)
        return _Tiled(bq, bk, mask, stack(*mask[:3], -1), stack(*mask[:3], 1), stack(*mask[3:], 1),
                      stack(*mask[3:], -1))


def _heads(x, length: int) -> jax.Array:
    """`[B, L, H, D]` -> `[B, H, length, D]`, padded with zeros."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)


def _tokens(x, length: int) -> jax.Array:
    """`_heads` undone: `[B, H, Lp, D]` -> `[B, length, H, D]`."""
    return x.transpose(0, 2, 1, 3)[:, :length]


def _call(kernel, name: str, grid, tables, in_specs, out_specs, out_shape, scratch, interpret: bool, *args):
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(*(x.reshape(-1) for x in tables), *args)


def _query_major_specs(tiled: _Tiled, d: int, group: int):
    """Block specs on the forward's grid `(batch, heads, query tiles, KV steps)`, the KV tile from its plan:
    (per query head `[bq, D]`, per KV head `[bk, D]`, lse/delta row `[1, bq]`, query vectors, key vectors)."""
    bq, bk, nq, nk = tiled.bq, tiled.bk, tiled.nq, tiled.nk
    kv_tile = lambda b, i, j, tiles: tiles[(b * nq + i) * nk + j]
    kv_head = lambda h: jax.lax.div(h, group)  # not h // group: see `_backward`
    return (pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, t, _: (b, kv_head(h), kv_tile(b, i, j, t), 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
            pl.BlockSpec((None, bq, 3), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 3, bk), lambda b, h, i, j, t, _: (b, 0, kv_tile(b, i, j, t))))


def _forward(q, k, v, mask: MaskInfo | None, block_q: int, block_kv: int, interpret: bool):
    """The output `[B, T, H, D]` and log-sum-exp `[B, H, 1, Tp]` for q `[B, T, H, D]`, k/v `[B, S, KV, D]` (one
    device's shard; mask None: every key)."""
    b, t, h, d = q.shape
    tiled = _Tiled.of(q, k, mask, block_q, block_kv)
    tp, sp = tiled.nq * tiled.bq, tiled.nk * tiled.bk
    per_q, per_kv, row, q_vecs, k_vecs = _query_major_specs(tiled, d, h // k.shape[2])
    out, lse = _call(
        _forward_kernel, "molmo2_attention", (b, h, tiled.nq, tiled.nk), tile_plan(tiled.mask, tiled.bq, tiled.bk),
        [per_q, per_kv, per_kv, q_vecs, k_vecs], [per_q, row],
        [jax.ShapeDtypeStruct((b, h, tp, d), q.dtype), jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32)],
        [pltpu.VMEM((tiled.bq, 1), jnp.float32), pltpu.VMEM((tiled.bq, 1), jnp.float32),
         pltpu.VMEM((tiled.bq, d), jnp.float32)],
        interpret, _heads(q, tp), _heads(k, sp), _heads(v, sp), tiled.q_cols, tiled.k_rows)
    return _tokens(out, t), lse


def _backward(q, k, v, mask, out, lse, d_out, block_q: int, block_kv: int, interpret: bool):
    """dQ, dK, dV by the two backward kernels; lse as `_forward` gives it."""
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = h // kv_heads
    tiled = _Tiled.of(q, k, mask, block_q, block_kv)
    bq, bk, nq, nk = tiled.bq, tiled.bk, tiled.nq, tiled.nk
    tp, sp = nq * bq, nk * bk
    qh, kh, vh, doh = _heads(q, tp), _heads(k, sp), _heads(v, sp), _heads(d_out, tp)
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)  # rowsum(dO * O) [B, T, H]
    delta = jnp.pad(delta, [(0, 0), (0, tp - t), (0, 0)]).transpose(0, 2, 1)[:, :, None]  # [B, H, 1, Tp]

    per_q, per_kv, row, q_vecs, k_vecs = _query_major_specs(tiled, d, group)
    dq = _call(_dq_kernel, "molmo2_attention_dq", (b, h, nq, nk), tile_plan(tiled.mask, bq, bk),
               [per_q, per_kv, per_kv, per_q, row, row, q_vecs, k_vecs], per_q,
               jax.ShapeDtypeStruct(qh.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)],
               interpret, qh, kh, vh, doh, lse, delta, tiled.q_cols, tiled.k_rows)

    # grid (batch, KV heads, KV tiles, steps): step g * nq + n is the n-th query tile of the KV tile's list under
    # head g of the group; past the list, the index maps repeat its last tile (no copy). lax.div/rem, not // and %:
    # their floor semantics lower through `sign`, whose Mosaic rule asks the current mesh's device for the TPU
    # generation, or else the default device (a CPU when compiling ahead of time without a mesh: it fails)
    q_tile = lambda b_, j, step, tiles: tiles[(b_ * nk + j) * nq + jax.lax.rem(step, nq)]
    head = lambda kv_h, step: kv_h * group + jax.lax.div(step, nq)
    per_kv = pl.BlockSpec((None, None, bk, d), lambda b_, kv_h, j, step, *_: (b_, kv_h, j, 0))
    per_q = pl.BlockSpec((None, None, bq, d),
                         lambda b_, kv_h, j, step, t_, _: (b_, head(kv_h, step), q_tile(b_, j, step, t_), 0))
    row = pl.BlockSpec((None, None, 1, bq),
                       lambda b_, kv_h, j, step, t_, _: (b_, head(kv_h, step), 0, q_tile(b_, j, step, t_)))
    k_vecs = pl.BlockSpec((None, bk, 3), lambda b_, kv_h, j, step, *_: (b_, j, 0))
    q_vecs = pl.BlockSpec((None, 3, bq), lambda b_, kv_h, j, step, t_, _: (b_, 0, q_tile(b_, j, step, t_)))
    dk, dv = _call(functools.partial(_dkv_kernel, nq=nq), "molmo2_attention_dkv", (b, kv_heads, nk, group * nq),
                   tile_plan(tiled.mask, bq, bk, by_key=True),
                   [per_kv, per_kv, per_q, per_q, row, row, k_vecs, q_vecs], [per_kv, per_kv],
                   [jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
                   [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
                   interpret, kh, vh, qh, doh, lse, delta, tiled.k_cols, tiled.q_rows)
    return _tokens(dq, t), _tokens(dk, s), _tokens(dv, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, mask, block_q, block_kv, interpret):
    return _forward(q, k, v, mask, block_q, block_kv, interpret)[0]


def _attend_fwd(q, k, v, mask, block_q, block_kv, interpret):
    out, lse = _forward(q, k, v, mask, block_q, block_kv, interpret)
    return out, (q, k, v, mask, out, lse)


def _attend_bwd(block_q, block_kv, interpret, residuals, d_out):
    return (*_backward(*residuals, d_out, block_q, block_kv, interpret), None)


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
