"""Weighted next-token cross-entropy with the z-loss, in fp32, from the logits or chunked from the hidden states.

The step normalises by the sum of `loss_weights` over the whole optimizer batch (all micro-batches), so
accumulating micro-batches gives exactly the loss of one large batch:
    loss = sum(w * ce) / sum(w) + z_loss_scale * sum(w * logsumexp(logits)^2) / sum(w)

`chunked_weighted_sums` gives the same sums (and gradients) from the final hidden states and the LM head without
ever holding the `[B, T, V]` fp32 logits: a `lax.scan` over token chunks computes one chunk's logits at a time, and
its custom VJP recomputes them chunk by chunk in the backward pass, keeping only the per-token log-sum-exp between
the two. At 16k tokens x a 152k vocabulary the logits, their softmax and gradient are most of a step's memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molmo2_jax.model.molmo2 import lm_logits

SUM_KEYS = ("ce", "z", "weight", "correct")


def _token_stats(logits: jax.Array, target_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token of fp32 logits `[..., V]`: the log-sum-exp, the target's logit and whether it is the argmax."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    targets = jnp.clip(target_ids, 0, logits.shape[-1] - 1)  # ids where w == 0 may be padding (-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return lse, target_logit, correct


def _sums(w: jax.Array, lse: jax.Array, target_logit: jax.Array, correct: jax.Array) -> dict[str, jax.Array]:
    return {"ce": jnp.sum(w * (lse - target_logit)), "z": jnp.sum(w * lse * lse), "weight": jnp.sum(w),
            "correct": jnp.sum(w * correct)}


def weighted_sums(logits: jax.Array, target_ids: jax.Array, loss_weights: jax.Array) -> dict[str, jax.Array]:
    """Un-normalised sums over tokens: `ce` (weighted cross-entropy), `z` (weighted logsumexp^2), `weight`,
    `correct` (weighted top-1 hits). logits `[B, T, V]` (any float dtype; computed in fp32)."""
    logits = logits.astype(jnp.float32)
    return _sums(loss_weights.astype(jnp.float32), *_token_stats(logits, target_ids))


# ----------------------------------------------------------------------------------------------------
# Chunked over tokens


def chunked_weighted_sums(hidden: jax.Array, lm_head: jax.Array, target_ids: jax.Array, loss_weights: jax.Array,
                          chunks: int) -> dict[str, jax.Array]:
    """`weighted_sums(lm_logits(hidden, lm_head), target_ids, loss_weights)` in `chunks` token chunks. hidden
    `[B, T, D]` (compute dtype), lm_head `[D, V]`, targets / weights `[B, T]`; `chunks` must divide T.

    Chunk j holds positions j, j + chunks, j + 2 * chunks, ... of every row: strided, so that each chunk spans
    every row and every sequence shard alike (the batch and sequence shardings carry over to the chunk axes,
    every device works on every chunk, nothing is resharded) where contiguous chunks would put a whole chunk on
    the devices of one sequence shard."""
    b, t, _ = hidden.shape

    def split(x, names):  # [B, T, ...] -> [chunks, B, T / chunks, ...]
        x = jnp.moveaxis(x.reshape(b, t // chunks, chunks, *x.shape[2:]), 2, 0)
        return nn.with_logical_constraint(x, (None, "act_batch", "act_length", *names))

    return _chunked(split(hidden, ("act_embed",)), lm_head, split(target_ids, ()),
                    split(loss_weights.astype(jnp.float32), ()))


def _chunk_logits(h: jax.Array, lm_head: jax.Array) -> jax.Array:
    """One chunk's fp32 logits `[B, C, V]`, laid out as the model lays out its full logits."""
    return nn.with_logical_constraint(lm_logits(h, lm_head), ("act_batch", "act_length", "act_vocab"))


def _forward(hidden, lm_head, targets, weights):
    """The sums and the per-token log-sum-exp `[chunks, B, C]` (what the backward pass keeps)."""

    def chunk(total, xs):
        h, tgt, w = xs
        lse, target_logit, correct = _token_stats(_chunk_logits(h, lm_head), tgt)
        return jax.tree_util.tree_map(jnp.add, total, _sums(w, lse, target_logit, correct)), lse

    zeros = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    return jax.lax.scan(chunk, zeros, (hidden, targets, weights))


@jax.custom_vjp
def _chunked(hidden, lm_head, targets, weights):
    return _forward(hidden, lm_head, targets, weights)[0]


def _chunked_fwd(hidden, lm_head, targets, weights):
    sums, lse = _forward(hidden, lm_head, targets, weights)
    return sums, (hidden, lm_head, targets, weights, lse)


def _chunked_bwd(residuals, cotangents):
    """Only `ce` and `z` are differentiable (`weight` and `correct` are counts). Per token, with p = softmax:
    d ce / d logits = p - onehot(target), d lse^2 / d logits = 2 lse p."""
    hidden, lm_head, targets, weights, lse = residuals
    g_ce, g_z = cotangents["ce"], cotangents["z"]
    compute = hidden.dtype
    head = lm_head.astype(compute)
    vocab = lm_head.shape[-1]

    def chunk(d_head, xs):
        h, tgt, w, lse_c = xs
        probs = jnp.exp(_chunk_logits(h, lm_head) - lse_c[..., None])
        onehot = jnp.arange(vocab) == jnp.clip(tgt, 0, vocab - 1)[..., None]
        d_logits = (w * (g_ce + 2 * g_z * lse_c))[..., None] * probs - jnp.where(onehot, (w * g_ce)[..., None], 0)
        d_logits = d_logits.astype(compute)
        d_h = jnp.einsum("bcv,dv->bcd", d_logits, head, preferred_element_type=jnp.float32).astype(compute)
        d_head = d_head + jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32)
        # the accumulator keeps the lm_head's own (fsdp x tensor) sharding: no device holds the whole [D, V]
        return nn.with_logical_constraint(d_head, ("embed", "vocab")), d_h

    d_head = nn.with_logical_constraint(jnp.zeros(lm_head.shape, jnp.float32), ("embed", "vocab"))
    d_head, d_hidden = jax.lax.scan(chunk, d_head, (hidden, targets, weights, lse))
    return d_hidden, d_head.astype(lm_head.dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def targets_from_labels(labels: np.ndarray, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """transformers' causal-LM `labels` (`[B, T]`, the input ids with `ignore_index` where no loss is taken; the
    model shifts them: the logits at t predict `labels[t + 1]`) -> our `target_ids` / `loss_weights` `[B, T]`
    (aligned with the logits: `target_ids[t]` is what the logits at t predict; uniform weights, 0 where ignored).
    With these, `sum(w * ce) / sum(w)` is transformers' loss: the mean over every non-ignored target of the batch."""
    labels = np.asarray(labels)
    shifted = np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], ignore_index)], axis=1)
    weights = (shifted != ignore_index).astype(np.float32)
    return np.where(weights > 0, shifted, 0).astype(np.int32), weights
