"""The decoder: Qwen3 style (pre-norm, per-head q/k RMSNorm, GQA) or Olmo3 style (post-norm, q/k RMSNorm over
all heads, YaRN only on `rope_scaling_layers`), selected by the config. Layers are scanned; an optional KV
cache (one slice per layer) is read and written in place at `cache_index`."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.attention import attention
from molmo2_jax.model.layers import MaskInfo, RMSNorm, apply_rope, dense, stack_layers


class RopeTables(NamedTuple):
    """cos/sin `[B, T, head_dim]` for the scaled (YaRN) and the plain table; layers pick one by flag."""

    cos_scaled: jax.Array
    sin_scaled: jax.Array
    cos_plain: jax.Array
    sin_plain: jax.Array


class DecoderLayer(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, x: jax.Array, rope: RopeTables, mask: MaskInfo, cache_index: jax.Array | None,
                 scaled: jax.Array, kv: tuple[jax.Array, jax.Array] | None):
        t, dtype, pdtype = self.config.text, self.config.dtype, self.config.param_dtype
        norm = lambda name: RMSNorm(axes=("embed",), eps=t.layer_norm_eps, dtype=dtype, param_dtype=pdtype,
                                    name=name)

        # attention
        h = x if t.norm_after else norm("attn_norm")(x)
        q = dense((t.num_heads, t.head_dim), ("embed", "heads", "head_dim"), use_bias=t.qkv_bias, dtype=dtype,
                  param_dtype=pdtype, name="q")(h)
        k = dense((t.num_kv_heads, t.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=t.qkv_bias,
                  dtype=dtype, param_dtype=pdtype, name="k")(h)
        v = dense((t.num_kv_heads, t.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=t.qkv_bias,
                  dtype=dtype, param_dtype=pdtype, name="v")(h)
        # qwen3: RMSNorm over head_dim per head; olmo: over the whole projection (all heads at once)
        qk_axes = ("head_dim",) if t.qk_norm_type == "qwen3" else ("heads", "head_dim")
        q = RMSNorm(axes=qk_axes, eps=t.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="q_norm")(q)
        k_axes = qk_axes if t.qk_norm_type == "qwen3" else ("kv_heads", "head_dim")
        k = RMSNorm(axes=k_axes, eps=t.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="k_norm")(k)
        cos = jnp.where(scaled, rope.cos_scaled, rope.cos_plain)
        sin = jnp.where(scaled, rope.sin_scaled, rope.sin_plain)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        if kv is not None:  # write this step's keys/values into the cache, attend over the whole cache
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            kv = (k, v)
        attn = attention(q, k.astype(dtype), v.astype(dtype), mask, self.config)
        h = dense(t.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                  contract=(-2, -1), name="o")(attn)
        x = x + (norm("attn_norm")(h) if t.norm_after else h)

        # MLP (SwiGLU)
        h = x if t.norm_after else norm("ff_norm")(x)
        gate = dense(t.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                     name="gate")(h)
        up = dense(t.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                   name="up")(h)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        h = dense(t.hidden_size, ("mlp", "embed"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                  name="down")(h)
        x = x + (norm("ff_norm")(h) if t.norm_after else h)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, kv


class Decoder(nn.Module):
    """inputs_embeds `[B, T, D]` -> final-normed hidden states `[B, T, D]` (and the updated cache)."""

    config: Molmo2Config

    @nn.compact
    def __call__(self, x: jax.Array, rope: RopeTables, mask: MaskInfo, cache_index: jax.Array | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None):
        t = self.config.text
        scaled = jnp.asarray([t.layer_uses_scaled_rope(i) for i in range(t.num_layers)])
        layers = stack_layers(DecoderLayer, t.num_layers, self.config.remat_policy, broadcast_args=3,
                              scanned_args=2, name="layers", config=self.config)
        x, kv = layers(x, rope, mask, cache_index, scaled, kv)
        x = RMSNorm(axes=("embed",), eps=t.layer_norm_eps, dtype=self.config.dtype,
                    param_dtype=self.config.param_dtype, name="final_norm")(x)
        return x, kv
