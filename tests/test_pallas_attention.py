"""The Pallas attention kernel (model/pallas_attention.py) in interpret mode on CPU against the blockwise path:
forward and gradients (the Pallas backward kernels) in float32, the tile plans (forward and transposed) against the
dense mask, the config dispatch, and the sharded (shard_map) call on 8 simulated devices in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_setup import configure

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.attention import attention, blockwise_attention
from molmo2_jax.model.layers import MaskInfo
from molmo2_jax.model.pallas_attention import pallas_attention, skipped_fraction, tile_plan, tile_rows

ROOT = Path(__file__).parent.parent
FRAME = 4 + 83  # a video frame: ~4 timestamp text tokens, then <frame_start>, 81 patches, <frame_end> (spec 4.x)


def video_example(frames: int, length: int, prefix: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(slot offsets, visual flags) of one example: `prefix` text tokens, `frames` frames, text to `length`."""
    mm = np.zeros(length, bool)
    for f in range(frames):
        start = prefix + f * FRAME + 4
        mm[start:start + 83] = True
    return np.arange(length, dtype=np.int32), mm


def packed_row(examples: list[tuple[int, int]], length: int) -> MaskInfo:
    """One row (batch 1) packing `(frames, tokens)` examples, padded to `length`; self-attention vectors."""
    seg, idx, mm = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, bool)
    at = 0
    for n, (frames, tokens) in enumerate(examples):
        idx[at:at + tokens], mm[at:at + tokens] = video_example(frames, tokens)
        idx[at:at + tokens] += at  # slots count along the packed row
        seg[at:at + tokens] = n + 1
        at += tokens
    vecs = [jnp.asarray(x)[None] for x in (seg, idx, mm)]
    return MaskInfo(*vecs, *vecs)


def _inputs(b, t, s, h, kv, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, kv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, kv, d), jnp.float32)
    return q, k, v, jax.random.normal(keys[3], (b, t, h, d), jnp.float32)


def _mixed_mask(t: int, s: int) -> MaskInfo:
    """Two rows: a packed row of two examples (images, text between them, padding at the end) and one example
    whose queries are the last `t` of `s` slots (a chunk of prefill against a cache)."""
    k_seg = np.ones((2, s), np.int32)
    k_seg[0, 170:] = 2
    k_seg[0, s - 25:] = 0
    k_idx = np.tile(np.arange(s, dtype=np.int32), (2, 1))
    k_mm = np.zeros((2, s), bool)
    k_mm[0, 10:60] = k_mm[0, 90:120] = k_mm[0, 200:260] = True
    k_mm[1, 30:150] = k_mm[1, s - 60:s - 20] = True
    q = slice(s - t, s)
    vecs = (k_seg[:, q], k_idx[:, q], k_mm[:, q], k_seg, k_idx, k_mm)
    return MaskInfo(*(jnp.asarray(x) for x in vecs))


def _assert_matches_blockwise(q, k, v, w, mask, block):
    """Output and gradients (through the Pallas backward kernels, not a fallback) equal the blockwise path's."""
    loss = lambda f: lambda q, k, v: (f(q, k, v, mask, block_q=block, block_kv=block) * w).sum()
    out = pallas_attention(q, k, v, mask, block_q=block, block_kv=block)
    ref = blockwise_attention(q, k, v, mask, block_q=block, block_kv=block)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    grad = jax.grad(loss(pallas_attention), (0, 1, 2))
    jaxpr = str(jax.make_jaxpr(grad)(q, k, v))
    assert "molmo2_attention_dq" in jaxpr and "molmo2_attention_dkv" in jaxpr
    grads, ref_grads = grad(q, k, v), jax.grad(loss(blockwise_attention), (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))
    return grads


@pytest.mark.parametrize("t,s,block", [(300, 300, 128), (130, 300, 128), (300, 300, 256)])
def test_forward_and_gradients_match_blockwise(t, s, block):
    q, k, v, w = _inputs(2, t, s, 4, 2, 32)  # GQA: 4 heads over 2 KV heads
    _assert_matches_blockwise(q, k, v, w, _mixed_mask(t, s), block)


def test_gradients_where_the_backward_skips_tiles():
    """Two packed examples then padding in 4 x 4 tiles of 128: both plans skip tiles (the other example's, and
    causal ones), have full tiles, and the dK/dV plan is the forward's transposed."""
    mask = packed_row([(2, 260), (1, 200)], 512)
    tiles, kinds = (np.asarray(x)[0] for x in tile_plan(mask, 128, 128))
    key_tiles, key_kinds = (np.asarray(x)[0] for x in tile_plan(mask, 128, 128, by_key=True))
    by_query, by_key = np.zeros((4, 4), int), np.zeros((4, 4), int)
    for i in range(4):
        for n in range(4):
            by_query[i, tiles[i, n]] = max(by_query[i, tiles[i, n]], kinds[i, n])
            by_key[key_tiles[i, n], i] = max(by_key[key_tiles[i, n], i], key_kinds[i, n])
    assert np.array_equal(by_key, by_query) and (by_key == 0).any() and (by_key == 2).any()
    q, k, v, w = _inputs(1, 512, 512, 4, 2, 32, seed=1)
    _assert_matches_blockwise(q, k, v, w, mask, 128)


def test_no_mask_and_empty_rows():
    q, k, v, w = _inputs(1, 200, 200, 2, 2, 16)
    _assert_matches_blockwise(q, k, v, w, None, 128)
    mask = MaskInfo(*(x[:1] for x in _mixed_mask(200, 200)))  # queries and keys from 175 on: padding
    out = pallas_attention(q, k, v, mask, block_q=128, block_kv=128)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[0, 175:] == 0)  # padded queries: zeros, no NaN
    dq, dk, dv = _assert_matches_blockwise(q, k, v, w, mask, 128)
    assert not np.asarray(dq)[0, 175:].any() and not np.asarray(dk)[0, 175:].any() and not np.asarray(dv)[0, 175:].any()


@pytest.mark.parametrize("layout", ["one", "two"])
def test_tile_plan_skips_exactly_the_empty_tiles(layout):
    """Kind 0 only where the dense mask has no allowed pair, kind 2 only where it allows every pair, and each
    query tile's list visits every tile that holds an allowed pair. 48 frames, a scaled-down 384-frame row."""
    examples = [(48, 4608)] if layout == "one" else [(24, 2304), (24, 2304)]
    mask = packed_row(examples, 4608)
    bq = bk = tile_rows(4608, 512)
    tiles, kinds = (np.asarray(x)[0] for x in tile_plan(mask, bq, bk))
    allowed = np.asarray(mask.allowed())[0, 0]
    n = allowed.shape[0] // bq
    blocks = allowed.reshape(n, bq, n, bk).transpose(0, 2, 1, 3)
    kind_of = np.zeros((n, n), int)
    for i in range(n):
        for j in range(n):
            if kinds[i, j]:
                kind_of[i, tiles[i, j]] = kinds[i, j]
    assert np.array_equal(kind_of > 0, blocks.any((2, 3)))  # the summaries are exact on these layouts
    assert np.array_equal(kind_of == 2, blocks.all((2, 3)))
    skipped, full = skipped_fraction(mask)
    assert skipped == pytest.approx(1 - blocks.any((2, 3)).mean())


def test_config_selects_the_kernel_from_1024_keys():
    config = Molmo2Config().replace(attention="pallas", attention_block_q=512, attention_block_kv=512)
    q, k, v, _ = _inputs(1, 1024, 1024, 2, 1, 16)
    mask = packed_row([(8, 700), (2, 300)], 1024)
    jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, config))(q, k, v, mask))
    assert "pallas_call" in jaxpr and "molmo2_attention" in jaxpr  # interpret mode on CPU, Mosaic on TPU
    np.testing.assert_allclose(attention(q, k, v, mask, config),
                               blockwise_attention(q, k, v, mask, block_q=512, block_kv=512), rtol=1e-5, atol=1e-6)


def _sharded_worker() -> None:
    """Run as a script: the kernel under a data=2 sequence=2 tensor=2 mesh against the unsharded call."""
    configure(devices=8)
    from jax.sharding import NamedSharding, PartitionSpec

    from molmo2_jax.sharding import activate, make_mesh

    mesh = make_mesh("data=2,sequence=2,tensor=2")
    q, k, v, w = _inputs(2, 256, 256, 4, 2, 16)
    mask = _mixed_mask(256, 256)
    loss = lambda q, k, v: (pallas_attention(q, k, v, mask, block_q=128, block_kv=128) * w).sum()
    want = jax.value_and_grad(loss, (0, 1, 2))(q, k, v)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    q, k, v = put(q, ("data", "sequence", "tensor")), put(k, ("data",)), put(v, ("data",))
    with activate(mesh):
        got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    errors = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(jax.tree.leaves(got),
                                                                             jax.tree.leaves(want))]
    print(json.dumps({"errors": errors}))


@pytest.mark.slow
def test_sharded_call_matches_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])["errors"]
    assert max(errors) < 1e-5, errors


if __name__ == "__main__":
    _sharded_worker()
