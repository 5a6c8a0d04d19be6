"""The decoder: Qwen3 style (pre-norm, per-head q/k RMSNorm, GQA) or Olmo3 style (post-norm, q/k RMSNorm over
all heads, YaRN only on `rope_scaling_layers`), selected by the config. Layers are scanned (the params' stacked
layout, for training and prefill); a decode step applies the layers one by one with per-layer params and a KV
cache (`model/kv_cache.py`), see `model.molmo2.decode_step`."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model import kv_cache
from molmo2_jax.model.attention import attention
from molmo2_jax.model.layers import MaskInfo, RMSNorm, apply_rope, dense, stack_layers, swiglu


class RopeTables(NamedTuple):
    """cos/sin `[B, T, head_dim]` for the scaled (YaRN) and the plain table; layers pick one by flag."""

    cos_scaled: jax.Array
    sin_scaled: jax.Array
    cos_plain: jax.Array
    sin_plain: jax.Array


class DecoderLayer(nn.Module):
    """One layer. Without a cache: attention over the T tokens themselves, returning their keys/values when
    `return_kv` (a prompt's, for the cache). With a cache: the new tokens' keys/values are written into it and
    attend over its filled slots (`mask` unused); returns the layer's updated buffers."""

    config: Molmo2Config
    return_kv: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rope: RopeTables, mask: MaskInfo | None, scaled: jax.Array | bool,
                 cache: kv_cache.LayerCache | None = None):
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
        if cache is None:
            attn = attention(q, k, v, mask, self.config)
            kv = (k, v) if self.return_kv else None
        else:
            attn, kv = kv_cache.attend(q, k, v, cache)
        h = dense(t.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                  contract=(-2, -1), name="o")(attn)
        x = x + (norm("attn_norm")(h) if t.norm_after else h)

        # MLP (SwiGLU)
        h = x if t.norm_after else norm("ff_norm")(x)
        gate = dense(t.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                     name="gate")(h)
        up = dense(t.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                   name="up")(h)
        h = nn.with_logical_constraint(swiglu(gate, up), ("act_batch", "act_length", "act_mlp"))
        h = dense(t.hidden_size, ("mlp", "embed"), use_bias=False, dtype=dtype, param_dtype=pdtype,
                  name="down")(h)
        x = x + (norm("ff_norm")(h) if t.norm_after else h)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, kv


def final_norm(config: Molmo2Config) -> RMSNorm:
    """The norm after the last layer (params at `decoder/final_norm`)."""
    return RMSNorm(axes=("embed",), eps=config.text.layer_norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, name="final_norm")


class Decoder(nn.Module):
    """inputs_embeds `[B, T, D]` -> final-normed hidden states `[B, T, D]`, and with `return_kv` each layer's
    keys and values `[layers, B, T, KV, hd]`."""

    config: Molmo2Config

    @nn.compact
    def __call__(self, x: jax.Array, rope: RopeTables, mask: MaskInfo, return_kv: bool = False):
        t = self.config.text
        scaled = jnp.asarray([t.layer_uses_scaled_rope(i) for i in range(t.num_layers)])
        layers = stack_layers(DecoderLayer, t.num_layers, self.config.remat_policy, broadcast_args=2,
                              scanned_args=1, name="layers", config=self.config, return_kv=return_kv)
        x, kv = layers(x, rope, mask, scaled)
        return final_norm(self.config)(x), kv
