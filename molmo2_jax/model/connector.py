"""The connector: attention pooling over windows of ViT patch features, then a SwiGLU projector into the LLM
width. Each output token's query is the masked mean of its window; `-1` slots are masked keys. Windows index the
patches of their own batch row."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.attention import attention, uses_blockwise
from molmo2_jax.model.layers import MaskInfo, dense, swiglu
from molmo2_jax.model.vision import mesh_devices


class Connector(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, features: jax.Array, pooling_idx: jax.Array) -> jax.Array:
        """features `[B, patches, F*D]` (each row's own), pooling_idx `[B, tokens, K]` (indices into the row's
        patches, -1 = empty slot).

        Returns `[B, tokens, text_hidden]`; rows whose slots are all -1 give zeros.
        """
        a, dtype, pdtype = self.config.adapter, self.config.dtype, self.config.param_dtype
        b, t, slots = pooling_idx.shape
        # each row gathers from its own patches (batched gather: stays on the device holding the row)
        window = jax.vmap(lambda f, i: f[i])(features, jnp.maximum(pooling_idx, 0))  # [B, tokens, K, F*D]
        valid = (pooling_idx >= 0).reshape(b * t, slots)
        window = jnp.where(valid[..., None], window.reshape(b * t, slots, -1), 0).astype(dtype)
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(dtype)
        query = window.sum(1, keepdims=True) / count[..., None]  # [B * tokens, 1, F*D]

        axes = ("vit_features", "vit_heads", "head_dim")
        q = dense((a.num_heads, a.head_dim), axes, use_bias=True, dtype=dtype, param_dtype=pdtype, name="q")(query)
        k = dense((a.num_heads, a.head_dim), axes, use_bias=True, dtype=dtype, param_dtype=pdtype, name="k")(window)
        v = dense((a.num_heads, a.head_dim), axes, use_bias=True, dtype=dtype, param_dtype=pdtype, name="v")(window)
        if uses_blockwise(self.config.attention, slots):  # attention="blockwise" asks for it everywhere
            # one query per token over its window's valid slots: key segment 1 where valid, 0 (masked) where empty
            ones, zeros = jnp.ones((valid.shape[0], 1), jnp.int32), jnp.zeros(valid.shape, jnp.int32)
            mask = MaskInfo(ones, ones, ones.astype(bool), valid.astype(jnp.int32), zeros, zeros.astype(bool))
            pooled = attention(q, k, v, mask, self.config)
        else:
            pooled = pool_windows(q, k, v, valid)
        pooled = dense(a.hidden_size, ("vit_heads", "head_dim", "vit_embed"), use_bias=True, dtype=dtype,
                       param_dtype=pdtype, contract=(-2, -1), name="o")(pooled)[:, 0]

        gate = dense(a.intermediate_size, ("vit_embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                     name="gate")(pooled)
        up = dense(a.intermediate_size, ("vit_embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                   name="up")(pooled)
        out = dense(a.text_hidden_size, ("mlp", "embed"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                    name="down")(swiglu(gate, up))
        return nn.with_logical_constraint(out.reshape(b, t, -1), ("act_batch", "act_visual", "act_embed"))


def pool_windows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Attention of each window's one query over its few slots: q `[N, 1, H, D]`, k/v `[N, K, H, D]`, valid
    `[N, K]` -> `[N, 1, H, D]` (zeros for a window with no valid slot), as the dense path computes it but in
    elementwise products and sums over the K slots: the dense path's `[N * H]` tiny batched dots and the transposes
    around them cost more than the arithmetic on XLA:CPU. Logits, softmax and sums in fp32."""
    dtype = v.dtype
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.where(valid[..., None], (q * k).sum(-1) * (q.shape[-1] ** -0.5), -jnp.inf)  # [N, K, H]
    top = logits.max(1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    total = weights.sum(1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return (weights[..., None] * v).sum(1, keepdims=True).astype(dtype)


def chunk_tokens(config: Molmo2Config, rows: int, slots: int) -> int | None:
    """Pooled tokens per row in one connector chunk (None: one call): a device's rows together take the tokens of
    `vit_chunk` crops (a crop's patches over the window size `slots`), so a chunk's windows hold about as many
    feature vectors as one ViT chunk's output; one knob bounds both."""
    if config.vit_chunk is None:
        return None
    per_device = config.vit_chunk * -(-config.vision.num_patches // slots)
    local_rows = -(-rows // mesh_devices("act_batch"))
    return -(-per_device // local_rows)


def pool_in_chunks(connector: Connector, features: jax.Array, pooling_idx: jax.Array) -> jax.Array:
    """`connector(features, pooling_idx)`, run as a scan over chunks of each row's pooled tokens (`chunk_tokens`),
    each chunk rematerialised in the backward: only one chunk's windows, keys and values are live at a time, so
    connector memory stops growing with the token count. The tokens are padded to whole chunks with all -1 rows,
    whose outputs are dropped."""
    b, t, slots = pooling_idx.shape
    chunk = chunk_tokens(connector.config, b, slots)
    if chunk is None or t <= chunk or connector.is_initializing():
        return connector(features, pooling_idx)
    chunks = jnp.pad(pooling_idx, ((0, 0), (0, -t % chunk), (0, 0)), constant_values=-1)
    chunks = chunks.reshape(b, -1, chunk, slots).swapaxes(0, 1)  # [chunks, B, chunk, K]
    chunks = nn.with_logical_constraint(chunks, (None, "act_batch", "act_visual", None))
    body = nn.remat(lambda mdl, carry, feats, idx: (carry, mdl(feats, idx)), prevent_cse=False)
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, in_axes=(nn.broadcast, 0))
    _, out = scan(connector, None, features, chunks)  # [chunks, B, chunk, D]
    out = out.swapaxes(0, 1).reshape(b, -1, out.shape[-1])[:, :t]
    return nn.with_logical_constraint(out, ("act_batch", "act_visual", "act_embed"))
