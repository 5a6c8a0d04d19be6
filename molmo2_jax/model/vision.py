"""The ViT: a Dense patch embedding over 588-value patches, a learned 729-position table, pre-LN blocks with
tanh-GELU MLPs and biased attention. Only the blocks up to the deepest feature layer exist and run."""

from __future__ import annotations

import functools
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
    def __call__(self, x: jax.Array, layer: jax.Array):
        """x `[N, P, D]` -> the block's output. `layer` (the block's index) is scanned only to give a segment of
        the block scan its length."""
        del layer
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
        return nn.with_logical_constraint(x, ("act_crops", "act_patches", "act_embed")), None


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
        # one stack of blocks (params [layers, ...]); its length comes from the scanned block indices
        blocks = stack_layers(VisionBlock, None, self.config.remat_policy, broadcast_args=0, scanned_args=1,
                              name="blocks", config=self.config)
        wanted = self.config.adapter.vit_layers
        if self.is_initializing():  # creates the whole stack; the output only needs the right shape
            x, _ = blocks(x, jnp.arange(v.num_layers))
            return jnp.concatenate([x] * len(wanted), axis=-1)
        # The stack runs in segments that end at the feature layers, so only the hidden state is carried
        # through each scan (and saved per block for the backward), not a buffer of every feature layer.
        outputs, start = {}, 0
        for stop in sorted({layer + 1 for layer in wanted}):
            segment = nn.map_variables(lambda mdl, h, layers: mdl(h, layers), "params",
                                       trans_in_fn=functools.partial(_layer_slice, start, stop))
            x, _ = segment(blocks, x, jnp.arange(start, stop))
            outputs[stop - 1], start = x, stop
        return jnp.concatenate([outputs[layer] for layer in wanted], axis=-1)


def _layer_slice(start: int, stop: int, params):
    """Blocks `start..stop-1` of the stacked block params (and of any LoRA adapters stacked with them)."""
    return jax.tree.map(lambda a: a[start:stop], params)


def encode_in_chunks(vision: VisionTransformer, pixels: jax.Array) -> jax.Array:
    """`vision(pixels)`, run as a scan over chunks of `config.vit_chunk` crops per device (a chunk spans every
    device the crops are split over), each chunk rematerialised in the backward: only one chunk's activations
    are live at a time and only the chunks' pixels are saved, so ViT memory stops growing with the frame count.

    Chunk j is crops `[j * vit_chunk, (j + 1) * vit_chunk)` of every device's own slice of the crops, so no crop
    leaves its device on the way in or out. (Contiguous chunks of the global crop axis would each live on a few
    devices: XLA reshuffled every chunk onto all of them and all-gathered the stacked features back, holding the
    whole batch's fp32 features on every device.) The crops past the last whole chunk of each slice run as one
    smaller chunk after the scan, so no crop is computed for padding (the slices themselves are padded to equal
    length when the devices do not divide the crops)."""
    chunk = vision.config.vit_chunk
    if chunk is None or vision.is_initializing():
        return vision(pixels)
    n, devices = pixels.shape[0], mesh_devices("act_crops")
    local = -(-n // devices)  # crops per device (the last devices' slices padded when the axes do not divide n)
    if local <= chunk:
        return vision(pixels)
    steps, rest_crops = divmod(local, chunk)
    x = jnp.pad(pixels, [(0, devices * local - n)] + [(0, 0)] * (pixels.ndim - 1))
    x = nn.with_logical_constraint(x.reshape(devices, local, *pixels.shape[1:]), ("act_crops", None, None, None))

    def crops_of(start: jax.Array | int, size: int) -> jax.Array:  # crops [start, start + size) of every slice
        crops = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).reshape(devices * size, *x.shape[2:])
        return nn.with_logical_constraint(crops, ("act_crops", "act_patches", None))

    # Each step slices its chunk from the pixels themselves (a scan over a stacked copy of the chunks held that
    # copy, as large as the input, through the whole ViT), and its remat saves only the step's index.
    body = nn.remat(lambda mdl, carry, step: (carry, mdl(crops_of(step * chunk, chunk))), prevent_cse=False)
    _, features = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(
        vision, None, jnp.arange(steps))
    features = nn.with_logical_constraint(features, (None, "act_crops", "act_patches", None))
    rest = features.shape[2:]
    features = features.reshape(steps, devices, chunk, *rest).swapaxes(0, 1).reshape(devices, steps * chunk, *rest)
    if rest_crops:
        tail = nn.remat(lambda mdl: mdl(crops_of(steps * chunk, rest_crops)), prevent_cse=False)(vision)
        tail = nn.with_logical_constraint(tail, ("act_crops", "act_patches", None))
        features = jnp.concatenate([features, tail.reshape(devices, rest_crops, *rest)], axis=1)
    return features.reshape(devices * local, *rest)[:n]


def mesh_devices(logical: str) -> int:
    """How many devices the active mesh and rules split the logical axis `logical` over (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if mesh.empty or axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
