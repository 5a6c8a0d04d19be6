"""Blockwise attention (model/attention.py) against the dense reference in float32: outputs and gradients for
each mask shape Molmo2 produces, tile sizes that do not divide the length, the whole tiny model of both
families (logits and every parameter gradient) and a tile size that does not fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import mixed_batch, olmo3, rel_diff

from molmo2_jax.config import ConfigError, load_preset
from molmo2_jax.data.packing import MODEL_KEYS
from molmo2_jax.model import attention
from molmo2_jax.model.attention import blockwise_attention, tile_ranges, tile_size, uses_blockwise
from molmo2_jax.model.layers import MaskInfo, dot_product_attention
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import flatten

RTOL = 1e-5  # max |blockwise - dense| / max |dense|, per array


def full_mask(seg, mm) -> MaskInfo:
    """Vectors for whole sequences: queries and keys are the same tokens."""
    seg, mm = np.asarray(seg, np.int32), np.asarray(mm, bool)
    idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
    return MaskInfo(*(jnp.asarray(a) for a in (seg, idx, mm, seg, idx, mm)))


def cached_mask(t: int, q_from: int, slots: int, mm_runs, batch: int = 2) -> MaskInfo:
    """`t` queries written at slots `q_from..` of a `slots`-slot cache (as `Molmo2.__call__` builds them):
    slots after the queries are still empty (segment 0)."""
    k_seg = (np.arange(slots) < q_from + t).astype(np.int32)[None].repeat(batch, 0)
    k_mm = _mm_runs(slots, mm_runs)[None].repeat(batch, 0)
    k_idx = np.broadcast_to(np.arange(slots), k_seg.shape)
    q = slice(q_from, q_from + t)
    return MaskInfo(*(jnp.asarray(a) for a in (k_seg[:, q], k_idx[:, q], k_mm[:, q], k_seg, k_idx, k_mm)))


def _mm_runs(length: int, runs) -> np.ndarray:
    mm = np.zeros(length, bool)
    for start, stop in runs:
        mm[start:stop] = True
    return mm


T = 37  # prime: no tile size below divides it
CASES = {
    "causal": lambda: full_mask(np.ones((2, T)), np.zeros((2, T))),
    "padded": lambda: full_mask([[1] * 30 + [0] * 7, [0] * 9 + [1] * 28], np.zeros((2, T))),
    "packed": lambda: full_mask([[1] * 12 + [2] * 15 + [3] * 6 + [0] * 4, [1] * 5 + [2] * 32], np.zeros((2, T))),
    # visual tokens of two images / three frames in one example, text between them; row 1 packs two examples,
    # each with its own visual blocks (one example's block must not see the other's)
    "visual_blocks": lambda: full_mask(
        [[1] * T, [1] * 20 + [2] * 17],
        [_mm_runs(T, [(3, 11), (14, 20), (25, 33)]), _mm_runs(T, [(2, 8), (10, 16), (23, 30)])]),
    # a prefill chunk of 9 queries at slots 20..28 of a 48-slot cache, its visual tokens attending back to
    # earlier visual slots; and one decode step at slot 29
    "cached_chunk": lambda: cached_mask(9, 20, 48, [(5, 15), (20, 24)]),
    "decode_step": lambda: cached_mask(1, 29, 48, [(5, 15)]),
}
# (heads, kv heads, block_q, block_kv): grouped-query with small tiles both ways, and one tile covering it all
SHAPES = [(4, 2, 16, 8), (4, 4, 8, 24), (4, 2, 512, 512)]


def _qkv(t: int, s: int, heads: int, kv_heads: int, batch: int = 2, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return normal(batch, t, heads, dim), normal(batch, s, kv_heads, dim), normal(batch, s, kv_heads, dim), \
        normal(batch, t, heads, dim)


def _compare(q, k, v, cotangent, mask: MaskInfo | None, block_q: int, block_kv: int) -> dict[str, float]:
    """Relative max differences of the output and of d(sum(out * cotangent))/d(q, k, v)."""
    allowed = None if mask is None else mask.allowed()
    dense = lambda q, k, v: dot_product_attention(q, k, v, allowed)
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv)
    results = {}
    for name, f in (("dense", dense), ("blockwise", blockwise)):
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        results[name] = (out, *vjp(cotangent))
    return {key: rel_diff(b, d) for key, b, d in zip(("out", "dq", "dk", "dv"), results["blockwise"],
                                                      results["dense"])}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_equals_dense(case):
    mask = CASES[case]()
    for heads, kv_heads, block_q, block_kv in SHAPES:
        q, k, v, cot = _qkv(mask.q_seg.shape[1], mask.k_seg.shape[1], heads, kv_heads)
        diffs = _compare(q, k, v, cot, mask, block_q, block_kv)
        print(f"{case} heads {heads}/{kv_heads} tiles {block_q}x{block_kv}: "
              + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
        assert max(diffs.values()) <= RTOL, (heads, kv_heads, block_q, block_kv, diffs)


def test_rows_with_no_allowed_key_are_zero_with_zero_gradients():
    """Padding queries (segment 0) see nothing: zeros, never NaN, and no gradient flows through them."""
    mask = CASES["padded"]()
    q, k, v, cot = _qkv(T, T, 4, 2)
    f = lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=16, block_kv=8)
    out, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(cot)
    pad = ~np.asarray(mask.q_seg > 0)
    assert np.all(np.asarray(out)[pad] == 0) and np.all(np.asarray(dq)[pad] == 0)
    assert all(np.isfinite(np.asarray(x)).all() for x in (out, dq, dk, dv))
    assert np.all(np.asarray(dk)[pad] == 0) and np.all(np.asarray(dv)[pad] == 0)  # padded keys: no gradient


def test_vit_and_connector_shapes(monkeypatch):
    """No mask (ViT: two crops of 729 patches as one tile; as tiles of 368, padded keys masked; 64 keys in tiles
    of 16, none padded, no mask built) and the connector's one query over a window of 9 slots, some empty and one
    window wholly empty."""
    vit, small = _qkv(729, 729, 4, 4, batch=2), _qkv(64, 64, 4, 2)
    assert attention.tile_shape(729, 729, 1, 512, 512, masked=False) == (729, 729)
    for budget, block, args in ((attention.ONE_TILE_ELEMENTS, 512, vit), (0, 512, vit), (0, 16, small)):
        monkeypatch.setattr(attention, "ONE_TILE_ELEMENTS", budget)
        diffs = _compare(*args, None, block, block)
        print(f"vit {args[0].shape[1]} keys, blocks {block}, one-tile budget {budget}:", diffs)
        assert max(diffs.values()) <= RTOL, diffs
    valid = np.random.default_rng(1).random((6, 9)) < 0.6
    valid[0], valid[1] = False, True
    ones, zeros = np.ones((6, 1), np.int32), np.zeros((6, 9), np.int32)
    mask = MaskInfo(*(jnp.asarray(a) for a in (ones, ones, ones.astype(bool), valid.astype(np.int32), zeros,
                                                 zeros.astype(bool))))
    q, k, v, cot = _qkv(1, 9, 4, 4, batch=6)
    diffs = _compare(q, k, v, cot, mask, 8, 8)
    print("connector", diffs)
    assert max(diffs.values()) <= RTOL, diffs


def test_tiles_are_balanced_and_padding_is_small():
    assert tile_size(729, 512) == 368  # two tiles, 7 padded rows
    assert tile_size(37, 16) == 16  # three tiles, 11 padded rows
    assert tile_size(1, 512) == 1  # a decode step is not padded to a tile
    assert tile_size(8192, 512) == 512
    # masked attention keeps its tiles (they skip what the mask rules out); unmasked takes one tile where it fits
    assert attention.tile_shape(729, 729, 1, 512, 512) == (368, 368)
    assert attention.tile_shape(1, 8192, 4, 512, 512) == (1, 512)
    assert attention.tile_shape(2048, 2048, 1, 512, 512, masked=False) == (512, 512)
    assert uses_blockwise("auto", 729) and uses_blockwise("auto", 8192) and uses_blockwise("blockwise", 9)
    assert not uses_blockwise("auto", 9)  # the connector's pooling windows
    assert not uses_blockwise("dense", 8192)


def test_tile_ranges_skip_what_the_mask_rules_out():
    """Tiles of 16 over 64 tokens with visual tokens 20..39 (key tiles 1-2): each query tile visits the key tiles
    up to its diagonal, or up to the last visual tile when it holds visual tokens; a decode step at slot 29 of a
    64-slot cache visits only the two filled tiles."""
    as_tiles = lambda mask, part: tuple(jnp.moveaxis(x.reshape(x.shape[0], -1, 16), 1, 0) for x in (
        (mask.q_seg, mask.q_idx, mask.q_mm) if part == "q" else (mask.k_seg, mask.k_idx, mask.k_mm)))
    mask = full_mask(np.ones((2, 64)), np.stack([_mm_runs(64, [(20, 40)])] * 2))
    k_lo, k_hi, q_lo, q_hi = (np.asarray(x) for x in tile_ranges(as_tiles(mask, "q"), as_tiles(mask, "k")))
    assert k_lo.tolist() == [0, 0, 0, 0] and k_hi.tolist() == [1, 3, 3, 4]
    assert q_lo.tolist() == [0, 1, 1, 3] and q_hi.tolist() == [4, 4, 4, 4]
    decode = cached_mask(1, 29, 64, [(5, 15)])
    q_vecs = tuple(x[None] for x in (decode.q_seg, decode.q_idx, decode.q_mm))  # one query tile of 1 row
    k_lo, k_hi, _, _ = tile_ranges(q_vecs, as_tiles(decode, "k"))
    assert (int(k_lo[0]), int(k_hi[0])) == (0, 2)


# ----------------------------------------------------------------------------------------------------
# The whole model


@pytest.mark.parametrize("family", ["qwen3", "olmo3"])
def test_whole_model_blockwise_equals_dense(family):
    """Logits and the gradient of every parameter, with the decoder, the ViT and the connector all blockwise
    (tiles of 16 x 24 rows: several per sequence, none dividing 64 or 729)."""
    config = load_preset("tiny")
    config = olmo3(config) if family == "olmo3" else config
    batch = {k: jnp.asarray(v) for k, v in mixed_batch(config).items() if k in MODEL_KEYS}
    params = Molmo2(config.replace(attention="dense")).init(jax.random.key(0), **batch)["params"]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*batch["input_ids"].shape, config.text.vocab_size)),
                          jnp.float32)
    results = {}
    for impl in ("dense", "blockwise"):
        model = Molmo2(config.replace(attention=impl, attention_block_q=16, attention_block_kv=24))
        jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, **batch))(params))  # noqa: B023 (run here)
        assert ("bwd=_flash_bwd" in jaxpr) == (impl == "blockwise")  # the path asked for is the one that runs

        def loss(p):
            logits, _ = model.apply({"params": p}, **batch)  # noqa: B023 (differentiated in this iteration)
            return jnp.sum(logits * weights * batch["attention_mask"][..., None]), logits

        results[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
    (g_dense, l_dense), (g_block, l_block) = results["dense"], results["blockwise"]
    real = np.asarray(batch["attention_mask"]) > 0
    logit_diff = rel_diff(np.asarray(l_block)[real], np.asarray(l_dense)[real])
    assert logit_diff <= RTOL, logit_diff
    # A key bias adds q.b_k to every logit of a query's row, which softmax ignores: its true gradient is 0 and
    # both paths hold rounding noise there, so it is held to 0 on the scale of the query bias's gradient.
    flat_block, flat_dense = (flatten(nn.unbox(g)) for g in (g_block, g_dense))
    worst = ("", 0.0)
    for name, dense in flat_dense.items():
        if name.endswith("k/bias"):
            noise = max(np.abs(np.asarray(flat_block[name])).max(), np.abs(np.asarray(dense)).max())
            assert noise <= RTOL * np.abs(np.asarray(flat_dense[name.replace("k/bias", "q/bias")])).max(), name
            continue
        worst = max(worst, (name, rel_diff(flat_block[name], dense)), key=lambda x: x[1])
    print(f"{family}: logits {logit_diff:.1e}, worst parameter gradient {worst[0]} {worst[1]:.1e}")
    assert worst[1] <= RTOL, worst


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("value", [100, 0, -8])
def test_tile_that_does_not_fit_is_refused(value):
    with pytest.raises(ConfigError, match=rf"attention_block_kv = {value} does not fit a tile: use a positive "
                                          r"multiple of 8"):
        load_preset("tiny", [f"attention_block_kv={value}"])


def test_plan_refuses_a_tile_that_does_not_fit_before_compiling():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-m", "molmo2_jax.cli", "plan", "--model", "tiny", "--mesh", "fsdp=1",
                           "--batch", "1", "--seq", "64", "--tokens", "16", "attention_block_q=100"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "molmo2-jax plan: error: attention_block_q = 100 does not fit a tile: use a positive multiple of 8 (e.g. 512)"]
    assert proc.stdout == ""
