"""The whole Molmo2 model: ViT -> connector -> pooled visual tokens ADDED to the embeddings of the `<im_patch>`
tokens -> decoder with a causal mask OR-ed with a bidirectional block over the image/frame special tokens.

Inputs use the names of the transformers `Molmo2Processor` outputs. Shapes are static: crops, frames and
pooled tokens may be padded (zero pixels, `-1` pooling rows) and sequences padded (attention_mask 0), so one
compiled function serves a bucket of inputs. Images and videos may share a batch: `batch.patch_streams` says which
`<im_patch>` tokens take image and which take video feature rows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.batch import patch_streams, shift_pooling
from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.connector import Connector
from molmo2_jax.model.layers import EMBED_INIT, MaskInfo, fan_in_init, rope_cos_sin, rope_inv_freq
from molmo2_jax.model.text import Decoder, RopeTables
from molmo2_jax.model.vision import VisionTransformer

Cache = dict[str, Any]  # {"k", "v": [layers, B, S, KV, hd], "seg", "mm": [B, S], "index": scalar int}


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
        return self.vision(pixels)

    def visual_tokens(self, pixel_values: jax.Array | None, image_token_pooling: jax.Array | None,
                      pixel_values_videos: jax.Array | None = None, video_token_pooling: jax.Array | None = None):
        """Pooled, projected visual tokens for the image stream and the video stream (None where absent).

        One ViT pass over the crops and the frames together; video pooling indices are shifted past the crops.
        Each stream is `(tokens [rows, D], keep [rows])`; rows whose pooling slots are all -1 are not kept.
        """
        crops = [p for p in (pixel_values, pixel_values_videos) if p is not None and p.shape[0]]
        if not crops:
            return None, None
        features = self.vision(jnp.concatenate(crops, axis=0) if len(crops) > 1 else crops[0])
        shift = 0 if pixel_values is None else pixel_values.shape[0] * pixel_values.shape[1]
        streams = []
        for pooling, offset in ((image_token_pooling, 0), (video_token_pooling, shift)):
            if pooling is None or not pooling.shape[0]:
                streams.append(None)
                continue
            pooling = shift_pooling(pooling, offset)
            streams.append((self.connector(features, pooling), jnp.any(pooling >= 0, axis=-1)))
        return tuple(streams)

    # -- language model -----------------------------------------------------------------------------------

    def embed(self, input_ids: jax.Array, image_stream=None, video_stream=None,
              video_patch_mask: jax.Array | None = None) -> jax.Array:
        """Token embeddings with each visual token added at its `<im_patch>` position (in order of appearance,
        row-major over batch then sequence, per stream)."""
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
            tokens = tokens[jnp.argsort(~keep, stable=True)]  # kept rows first, in their order
            rank = jnp.cumsum(selected.reshape(-1)).reshape(selected.shape) - 1
            gathered = tokens[jnp.clip(rank, 0, tokens.shape[0] - 1)]
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
                 segment_ids: jax.Array | None = None, cache: Cache | None = None, return_hidden: bool = False):
        """Logits `[B, T, vocab]` in fp32 (or final hidden states), and the updated cache when one is given.

        `segment_ids` (0 = padding, 1.. = packed example) default to `attention_mask`; `position_ids` default to
        `cumsum(attention_mask) - 1` (left padding friendly). With a cache, the T new tokens are written at
        `cache["index"]` and attend to everything cached before them.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        seg = (attention_mask if segment_ids is None else segment_ids).astype(jnp.int32)
        mm = jnp.zeros((b, t), bool) if mm_token_type_ids is None else mm_token_type_ids.astype(bool)
        if position_ids is None:
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
            if cache is not None:
                position_ids = position_ids + cache["next_position"][:, None]

        image_stream, video_stream = self.visual_tokens(pixel_values, image_token_pooling, pixel_values_videos,
                                                        video_token_pooling)
        x = self.embed(input_ids, image_stream, video_stream, video_patch_mask)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        q_idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        if cache is None:
            mask = MaskInfo(seg, q_idx, mm, seg, q_idx, mm)
            hidden, _ = self.decoder(x, self.rope(position_ids), mask)
            new_cache = None
        else:
            index = cache["index"]
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], seg, index, axis=1)
            k_mm = jax.lax.dynamic_update_slice_in_dim(cache["mm"], mm, index, axis=1)
            k_idx = jnp.broadcast_to(jnp.arange(k_seg.shape[1])[None], k_seg.shape)
            mask = MaskInfo(seg, q_idx + index, mm, k_seg, k_idx, k_mm)
            hidden, (k, v) = self.decoder(x, self.rope(position_ids), mask, index, (cache["k"], cache["v"]))
            new_cache = {"k": k, "v": v, "seg": k_seg, "mm": k_mm, "index": index + t,
                         "next_position": position_ids[:, -1] + 1}
        if return_hidden:
            return hidden, new_cache
        logits = jnp.einsum("btd,dv->btv", hidden, self.lm_head.astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        return logits, new_cache


def init_cache(config: Molmo2Config, batch: int, max_length: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
    t = config.text
    shape = (t.num_layers, batch, max_length, t.num_kv_heads, t.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "seg": jnp.zeros((batch, max_length), jnp.int32), "mm": jnp.zeros((batch, max_length), bool),
            "index": jnp.zeros((), jnp.int32), "next_position": jnp.zeros((batch,), jnp.int32)}
