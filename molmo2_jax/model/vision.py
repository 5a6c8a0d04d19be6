"""The ViT: a Dense patch embedding over 588-value patches, a learned 729-position table, pre-LN blocks with
tanh-GELU MLPs and biased attention. Only the blocks up to the deepest feature layer exist and run."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.attention import attention
from molmo2_jax.model.layers import LayerNorm, dense, stack_layers


def sincos_2d_init(key, shape, dtype=jnp.float32):
    """A `[side * side, D]` position table holding 2-D sin-cos codes (x in the first half of D, y in the second).

    Only a model trained from scratch sees this (loaded checkpoints replace it): it starts knowing where each
    patch is, as fixed sin-cos tables give ViTs trained from scratch."""
    num, dim = shape
    side = math.isqrt(num)
    if side * side != num or dim % 4:
        return nn.initializers.normal(stddev=0.02)(key, shape, dtype)
    freqs = 1.0 / 10000 ** (jnp.arange(dim // 4) / (dim // 4))
    y, x = jnp.meshgrid(jnp.arange(side), jnp.arange(side), indexing="ij")
    codes = [f(c.reshape(-1, 1) * freqs) for c in (x, y) for f in (jnp.sin, jnp.cos)]
    return jnp.concatenate(codes, axis=1).astype(dtype)


class VisionBlock(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], layer: jax.Array):
        """carry = (x `[N, P, D]`, features `[F, N, P, D]`); the output of this block is stored in feature slot
        f when `layer == vit_layers[f]`."""
        x, features = carry
        v, dtype, pdtype = self.config.vision, self.config.dtype, self.config.param_dtype
        h = LayerNorm(eps=v.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="ln1")(x)
        qkv_axes = ("vit_embed", "vit_heads", "head_dim")
        q, k, vv = (dense((v.num_heads, v.head_dim), qkv_axes, use_bias=True, dtype=dtype, param_dtype=pdtype,
                          name=n)(h) for n in ("q", "k", "v"))
        attn = attention(q, k, vv, None, self.config)
        x = x + dense(v.hidden_size, ("vit_heads", "head_dim", "vit_embed"), use_bias=True, dtype=dtype,
                      param_dtype=pdtype, contract=(-2, -1), name="o")(attn)
        h = LayerNorm(eps=v.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="ln2")(x)
        h = dense(v.intermediate_size, ("vit_embed", "vit_mlp"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                  name="fc1")(h)
        h = jax.nn.gelu(h, approximate=True)
        x = x + dense(v.hidden_size, ("vit_mlp", "vit_embed"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                      name="fc2")(h)
        x = nn.with_logical_constraint(x, ("act_crops", "act_patches", "act_embed"))
        wanted = jnp.asarray(self.config.adapter.vit_layers)[:, None, None, None]
        features = jnp.where(wanted == layer, x[None], features)
        return (x, features), None


class VisionTransformer(nn.Module):
    """pixels `[N, 729, 588]` -> concatenated features of the adapter's ViT layers `[N, 729, F * D]`."""

    config: Molmo2Config

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        v, dtype, pdtype = self.config.vision, self.config.dtype, self.config.param_dtype
        x = dense(v.hidden_size, ("vit_in", "vit_embed"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                  name="patch_embed")(pixels.astype(dtype))
        pos = self.param("pos_embed", nn.with_logical_partitioning(sincos_2d_init, ("vit_in", "vit_embed")),
                         (v.num_patches, v.hidden_size), pdtype)
        x = x + pos.astype(dtype)[None]
        num_features = len(self.config.adapter.vit_layers)
        features = jnp.zeros((num_features, *x.shape), dtype)
        blocks = stack_layers(VisionBlock, v.num_layers, self.config.remat_policy, broadcast_args=0,
                              scanned_args=1, name="blocks", config=self.config)
        (_, features), _ = blocks((x, features), jnp.arange(v.num_layers))
        return jnp.concatenate(list(features), axis=-1)
