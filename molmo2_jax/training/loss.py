"""Weighted next-token cross-entropy with the z-loss, in fp32.

The step normalises by the sum of `loss_weights` over the whole optimizer batch (all micro-batches), so
accumulating micro-batches gives exactly the loss of one large batch:
    loss = sum(w * ce) / sum(w) + z_loss_scale * sum(w * logsumexp(logits)^2) / sum(w)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def weighted_sums(logits: jax.Array, target_ids: jax.Array, loss_weights: jax.Array) -> dict[str, jax.Array]:
    """Un-normalised sums over tokens: `ce` (weighted cross-entropy), `z` (weighted logsumexp^2), `weight`,
    `correct` (weighted top-1 hits). logits `[B, T, V]` (any float dtype; computed in fp32)."""
    logits = logits.astype(jnp.float32)
    w = loss_weights.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    targets = jnp.clip(target_ids, 0, logits.shape[-1] - 1)  # ids where w == 0 may be padding (-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"ce": jnp.sum(w * (lse - target_logit)), "z": jnp.sum(w * lse * lse), "weight": jnp.sum(w),
            "correct": jnp.sum(w * correct)}


def targets_from_labels(labels: np.ndarray, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """transformers' causal-LM `labels` (`[B, T]`, the input ids with `ignore_index` where no loss is taken; the
    model shifts them: the logits at t predict `labels[t + 1]`) -> our `target_ids` / `loss_weights` `[B, T]`
    (aligned with the logits: `target_ids[t]` is what the logits at t predict; uniform weights, 0 where ignored).
    With these, `sum(w * ce) / sum(w)` is transformers' loss: the mean over every non-ignored target of the batch."""
    labels = np.asarray(labels)
    shifted = np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], ignore_index)], axis=1)
    weights = (shifted != ignore_index).astype(np.float32)
    return np.where(weights > 0, shifted, 0).astype(np.int32), weights
