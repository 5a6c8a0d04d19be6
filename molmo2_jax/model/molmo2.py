"""The whole Molmo2 model: ViT -> connector -> pooled visual tokens ADDED to the embeddings of the `<im_patch>`
tokens -> decoder with a causal mask OR-ed with a bidirectional block over the image/frame special tokens.

Inputs follow the batch contract (`molmo2_jax.batch`): the transformers `Molmo2Processor` names, visual arrays
per row. Shapes are static: crops, frames and pooled tokens may be padded (zero pixels, `-1` pooling rows) and
sequences padded (attention_mask 0), so one compiled function serves a bucket of inputs. Images and videos may
share a batch: `batch.patch_streams` says which `<im_patch>` tokens take image and which take video feature rows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.batch import patch_streams, shift_pooling
from molmo2_jax.config import Molmo2Config
from molmo2_jax.model import kv_cache, zigzag
from molmo2_jax.model.connector import Connector, pool_in_chunks
from molmo2_jax.model.layers import EMBED_INIT, MaskInfo, fan_in_init, rope_cos_sin, rope_inv_freq
from molmo2_jax.model.text import Decoder, DecoderLayer, RopeTables, final_norm
from molmo2_jax.model.vision import VisionTransformer, encode_in_chunks


class Molmo2(nn.Module):
    config: Molmo2Config

    def setup(self):
        c = self.config
        self.vision = VisionTransformer(c)
        self.connector = Connector(c)
        self.decoder = Decoder(c)
        self.embedding = self.param("embedding", nn.with_logical_partitioning(EMBED_INIT, ("vocab", "embed")),
                                    (c.text.embedding_rows, c.text.hidden_size), c.param_dtype)
        self.lm_head = self.param("lm_head", nn.with_logical_partitioning(fan_in_init(1), ("embed", "vocab")),
                                  (c.text.hidden_size, c.text.vocab_size), c.param_dtype)

    # -- vision -----------------------------------------------------------------------------------------

    def vit_features(self, pixels: jax.Array) -> jax.Array:
        """`[N, 729, 588]` -> `[N, 729, F * D_vit]` (the concatenated feature layers)."""
        return encode_in_chunks(self.vision, pixels)

    def visual_tokens(self, pixel_values: jax.Array | None, image_token_pooling: jax.Array | None,
                      pixel_values_videos: jax.Array | None = None, video_token_pooling: jax.Array | None = None):
        """Pooled, projected visual tokens of each row for the image stream and the video stream (None where
        absent), from per-row inputs (`batch`: pixels `[B, crops, 729, 588]`, pooling `[B, tokens, K]`).

        One ViT pass over every row's crops and frames together; video pooling indices are shifted past the row's
        crops. Each stream is `(tokens [B, rows, D], keep [B, rows])`; rows whose pooling slots are all -1 are not
        kept.
        """
        crops = [p for p in (pixel_values, pixel_values_videos) if p is not None and p.shape[1]]
        if not crops:
            return None, None
        pixels = jnp.concatenate(crops, axis=1) if len(crops) > 1 else crops[0]
        b, n = pixels.shape[:2]
        features = encode_in_chunks(self.vision, pixels.reshape(b * n, *pixels.shape[2:]))  # [B * crops, 729, F*D]
        features = features.reshape(b, n * features.shape[1], features.shape[2])  # each row's patches
        shift = 0 if pixel_values is None else pixel_values.shape[1] * pixel_values.shape[2]
        streams = []
        for pooling, offset in ((image_token_pooling, 0), (video_token_pooling, shift)):
            if pooling is None or not pooling.shape[1]:
                streams.append(None)
                continue
            pooling = shift_pooling(pooling, offset)
            streams.append((pool_in_chunks(self.connector, features, pooling), jnp.any(pooling >= 0, axis=-1)))
        return tuple(streams)

    # -- language model -----------------------------------------------------------------------------------

    def embed(self, input_ids: jax.Array, image_stream=None, video_stream=None,
              video_patch_mask: jax.Array | None = None) -> jax.Array:
        """Token embeddings with each row's visual tokens added at its `<im_patch>` positions (per stream, in order
        of appearance); every gather stays inside its row."""
        ids = jnp.maximum(input_ids, 0)
        x = jnp.take(self.embedding, ids, axis=0).astype(self.config.dtype)
        if image_stream is None and video_stream is None:
            return x
        selections = patch_streams(ids, self.config.tokens.image_patch, video_patch_mask,
                                   has_images=image_stream is not None, has_videos=video_stream is not None)
        for stream, selected in zip((image_stream, video_stream), selections):
            if stream is None:
                continue
            tokens, keep = stream
            order = jnp.argsort(~keep, axis=1, stable=True)  # kept rows first, in their order
            tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)
            rank = jnp.cumsum(selected, axis=1) - 1  # [B, T]: which of its row's tokens an <im_patch> takes
            gathered = jnp.take_along_axis(tokens, jnp.clip(rank, 0, tokens.shape[1] - 1)[..., None], axis=1)
            x = x + jnp.where(selected[..., None], gathered, 0).astype(x.dtype)
        return x

    def rope(self, positions: jax.Array) -> RopeTables:
        t = self.config.text
        plain = rope_cos_sin(positions, *rope_inv_freq(t.head_dim, t.rope_theta))
        scaled = plain if t.rope_scaling is None else rope_cos_sin(
            positions, *rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling))
        return RopeTables(*scaled, *plain)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 mm_token_type_ids: jax.Array | None = None, video_patch_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None,
                 image_token_pooling: jax.Array | None = None, pixel_values_videos: jax.Array | None = None,
                 video_token_pooling: jax.Array | None = None, position_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_hidden: bool = False, return_kv: bool = False):
        """Logits `[B, T, vocab]` in fp32 (or final hidden states), and with `return_kv` each layer's keys and
        values `[layers, B, T, KV, hd]` (a prompt's, for `kv_cache.from_prompt`), else None.

        `segment_ids` (0 = padding, 1.. = packed example) default to `attention_mask`; `position_ids` default to
        `cumsum(attention_mask) - 1` (left padding friendly). With `config.context_balance = "zigzag"` the decoder
        may run on the tokens in another order (model/zigzag.py); inputs and outputs are in the natural order.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        seg = (attention_mask if segment_ids is None else segment_ids).astype(jnp.int32)
        mm = jnp.zeros((b, t), bool) if mm_token_type_ids is None else mm_token_type_ids.astype(bool)
        if position_ids is None:
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)

        image_stream, video_stream = self.visual_tokens(pixel_values, image_token_pooling, pixel_values_videos,
                                                        video_token_pooling)
        x = self.embed(input_ids, image_stream, video_stream, video_patch_mask)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        q_idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))  # each token's slot: what the causal mask compares
        shards = zigzag.shards(t) if self.config.context_balance == "zigzag" else 0
        if shards:  # the decoder runs on the tokens in zigzag order; the slots travel with them
            x = zigzag.to_zigzag(x, shards)
            vectors = zigzag.to_zigzag(jnp.stack([seg, q_idx, mm.astype(jnp.int32), position_ids.astype(jnp.int32)],
                                                 -1), shards)
            seg, q_idx, mm, position_ids = vectors[..., 0], vectors[..., 1], vectors[..., 2] > 0, vectors[..., 3]
        hidden, kv = self.decoder(x, self.rope(position_ids), MaskInfo(seg, q_idx, mm, seg, q_idx, mm), return_kv)
        if shards:
            hidden = zigzag.from_zigzag(hidden, shards)
            kv = None if kv is None else tuple(zigzag.from_zigzag(a, shards, axis=2) for a in kv)
        if return_hidden:
            return hidden, kv
        logits = nn.with_logical_constraint(lm_logits(hidden, self.lm_head), ("act_batch", "act_length", "act_vocab"))
        return logits, kv


def lm_logits(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """Hidden states `[..., D]` -> fp32 logits `[..., vocab]`."""
    return jnp.einsum("...d,dv->...v", hidden, lm_head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """What a decode step reads, with the decoder layers as one params tree per layer (the stacked layout
    would cost a copy of each layer's weights out of the stack on every step)."""
    stacked = params["decoder"]["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {"embedding": params["embedding"], "lm_head": params["lm_head"],
            "final_norm": params["decoder"]["final_norm"],
            "layers": tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))}


def decode_step(config: Molmo2Config, params: dict[str, Any], token: jax.Array,
                cache: kv_cache.Cache) -> tuple[jax.Array, kv_cache.Cache]:
    """One new token per row `[B]` -> its fp32 logits `[B, vocab]` and the cache with it appended. `params`
    from `decode_params`; the layers run one after the other (unrolled), each on its own weights and buffers."""
    # Molmo2's setup declares both of its own params, so both are given (the submodules are never built)
    module, own = Molmo2(config), {"params": {"embedding": params["embedding"], "lm_head": params["lm_head"]}}
    x = module.apply(own, token[:, None], method=Molmo2.embed)
    rope = module.apply(own, cache.next_position[:, None], method=Molmo2.rope)
    seg = jax.lax.dynamic_update_slice_in_dim(cache.seg, jnp.ones_like(cache.seg[:, :1]), cache.index, axis=1)
    keys, values = [], []
    for i, layer_params in enumerate(params["layers"]):
        layer = kv_cache.LayerCache(cache.k[i], cache.v[i], seg, cache.index)
        x, (k, v) = DecoderLayer(config).apply({"params": layer_params}, x, rope, None,
                                               config.text.layer_uses_scaled_rope(i), layer)
        keys.append(k)
        values.append(v)
    hidden = final_norm(config).apply({"params": params["final_norm"]}, x)
    cache = kv_cache.Cache(tuple(keys), tuple(values), seg, cache.index + 1, cache.next_position + 1)
    return lm_logits(hidden[:, -1], params["lm_head"]), cache
