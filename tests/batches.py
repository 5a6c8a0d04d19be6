"""Batches for tests, in the batch contract the model and the training step take (molmo2_jax/data/packing.py):
random tokens, crops and pooling indices for the tiny preset. The first part serves the training, LoRA, fault and
sharding tests; `mixed_batch` (images, a video, packed and padded rows) the equality tests of the model's paths."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from molmo2_jax.config import Molmo2Config, RopeScaling, load_preset
from molmo2_jax.data.packing import assemble
from molmo2_jax.preprocessing.collate import Bucket

TINY = load_preset("tiny")
SEQ, POOLED, CROPS = 24, 6, 1  # tokens per row, pooled image tokens per example, crops per example


def example(seed: int, with_image: bool, config: Molmo2Config = TINY) -> dict[str, np.ndarray]:
    """One unpacked example: tokens `[SEQ]` with a low-res image of POOLED tokens when `with_image`; visual arrays
    have no batch axis and pooling indices count this example's own crops (two padding rows)."""
    rng = np.random.default_rng(seed)
    tok, patches = config.tokens, config.vision.num_patches
    ids = list(rng.integers(1, 250, 4))
    if with_image:
        ids += [tok.low_res_image_start] + [tok.image_patch] * POOLED + [tok.image_end]
    ids += list(rng.integers(1, 250, SEQ - len(ids) - 3))
    n = len(ids)
    input_ids = np.array(ids + [tok.pad] * (SEQ - n), np.int32)
    pooling = np.full((POOLED + 2, 4), -1, np.int32)
    if with_image:
        pooling[:POOLED] = rng.integers(0, CROPS * patches, (POOLED, 4))
    targets = np.roll(input_ids, -1)
    weights = ((np.arange(SEQ) < n - 1) & ~np.isin(targets, tok.multimodal)).astype(np.float32)
    return {"input_ids": input_ids, "mm_token_type_ids": np.isin(input_ids, tok.multimodal).astype(np.int32),
            "segment_ids": (np.arange(SEQ) < n).astype(np.int32), "position_ids": np.arange(SEQ, dtype=np.int32),
            "target_ids": targets.astype(np.int32), "loss_weights": weights,
            "pixel_values": rng.uniform(-1, 1, (CROPS, patches, config.vision.patch_dim)).astype(np.float32)
            * with_image,
            "image_token_pooling": pooling}


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples -> one batch, one example per row (visual arrays per row, as the batch contract has them)."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def synthetic_batches(batch_size: int, seed: int = 0) -> grain.DatasetIterator:
    """A checkpointable Grain iterator of random batches, every other example with an image."""
    def make(i):
        return collate([example(seed + i * batch_size + j, (i + j) % 2 == 0) for j in range(batch_size)])
    return iter(grain.MapDataset.range(10_000).map(make).to_iter_dataset())


def training_batch(config: Molmo2Config, batch: int = 8, seq: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """A padded training batch: per example one crop, 4 pooled tokens after a low-res start token, text; one
    right-padded row and one partly empty pooling window."""
    rng = np.random.default_rng(seed)
    k, v = config.tokens, config.vision
    ids = rng.integers(1, config.text.vocab_size, (batch, seq))
    ids[:, 1], ids[:, 2:6], ids[:, 6] = k.low_res_image_start, k.image_patch, k.image_end
    mask = np.ones((batch, seq), np.int32)
    mask[1, -5:] = 0
    ids[1, -5:] = k.pad
    pooling = np.stack([rng.choice(v.num_patches, 4, replace=False) for _ in range(batch * 4)]).astype(np.int32)
    pooling = pooling.reshape(batch, 4, 4)  # each row's own crop
    pooling[0, 3, 2:] = -1
    weights = (mask * (np.arange(seq) > 6) * (np.arange(seq) < seq - 1)).astype(np.float32)
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask, "segment_ids": mask,
            "mm_token_type_ids": np.isin(ids, k.multimodal).astype(np.int32),
            "pixel_values": rng.standard_normal((batch, 1, v.num_patches, v.patch_dim)).astype(np.float32),
            "image_token_pooling": pooling, "loss_weights": weights,
            "target_ids": np.roll(ids, -1, axis=1).clip(0, config.text.vocab_size - 1).astype(np.int32)}


# -- equality tests of the model's paths (blockwise, per-row indices, chunks, context parallelism) ------------------

def rel_diff(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def gradient_diff(path: str, grads: dict, want: dict) -> float:
    """`rel_diff` of one parameter's gradient (flattened trees `grads`, `want`). A key bias adds q.b_k to every logit
    of a query's row alike, which softmax ignores whatever the mask: its true gradient is 0 and both sides hold
    rounding noise, so it is measured on the scale of the query bias's."""
    key_bias = path.endswith("k/bias")
    scale = want[path.replace("k/bias", "q/bias")] if key_bias else want[path]
    diff = np.max(np.abs(np.asarray(grads[path], np.float64) - np.asarray(want[path], np.float64)))
    return float(diff / max(np.max(np.abs(np.asarray(scale, np.float64))), 1e-30))


def olmo3(config: Molmo2Config) -> Molmo2Config:
    """The tiny preset turned Olmo3 style: post-norm, full-width qk-norm, MHA, YaRN on layer 0 only."""
    text = dataclasses.replace(config.text, qk_norm_type="olmo", norm_after=True, num_kv_heads=config.text.num_heads,
                               rope_scaling=RopeScaling(original_max_position_embeddings=64), rope_scaling_layers=(0,))
    return config.replace(text=text)


def multimodal_example(rng, tok, parts, empty_slots: bool = False) -> dict[str, np.ndarray]:
    """One example: `parts` is a list of ("text", n), ("image", tokens) or ("frame", tokens); images are one
    crop of 729 patches with 2x2 pooling, frames one crop with 3x3 pooling; pooling indices are local to the example.
    With `empty_slots`, each window's first row is partly empty and each image's pooling ends in an all -1 row (as
    the packer and the processor may leave them)."""
    ids, streams = [], {"image": ([], []), "frame": ([], [])}
    for kind, n in parts:
        if kind == "text":
            ids += rng.integers(1, 250, n).tolist()
            continue
        start, end = (tok.image_start, tok.image_end) if kind == "image" else (tok.frame_start, tok.frame_end)
        ids += [start] + [tok.image_patch] * n + [end]
        crops, pools = streams[kind]
        width = 4 if kind == "image" else 9
        pool = rng.integers(0, 729, (n, width)) + len(crops) * 729
        if empty_slots:
            pool[0, 1:] = -1
            pool = np.concatenate([pool, np.full((1, width), -1)]) if kind == "image" else pool
        pools.append(pool)
        crops.append(rng.uniform(-1, 1, (729, 588)).astype(np.float32))
    ids = np.asarray(ids, np.int32)
    ex = {"input_ids": ids, "mm_token_type_ids": np.isin(ids, tok.multimodal).astype(np.int32),
          "token_weights": np.ones(len(ids), np.float32)}
    for kind, (pixels_key, pooling_key) in (("image", ("pixel_values", "image_token_pooling")),
                                            ("frame", ("pixel_values_videos", "video_token_pooling"))):
        crops, pools = streams[kind]
        if crops:
            ex[pixels_key], ex[pooling_key] = np.stack(crops), np.concatenate(pools).astype(np.int32)
    return ex


def mixed_rows(rng, tok) -> list[list[dict[str, np.ndarray]]]:
    """Three rows of at most 64 tokens: two images in one example; a three-frame video (text between frames); two
    packed examples, each with its own image."""
    return [
        [multimodal_example(rng, tok, [("text", 3), ("image", 8), ("text", 2), ("image", 6), ("text", 5)])],
        [multimodal_example(rng, tok, [("text", 2), ("frame", 5), ("text", 2), ("frame", 5), ("text", 2),
                                       ("frame", 5), ("text", 9)])],
        [multimodal_example(rng, tok, [("text", 4), ("image", 7), ("text", 12)]),
         multimodal_example(rng, tok, [("text", 2), ("image", 9), ("text", 20)])],
    ]


def mixed_batch(config: Molmo2Config) -> dict[str, np.ndarray]:
    """`mixed_rows` assembled into 3 rows of 64 tokens, each padded (tokens, crops, frames, pooled tokens)."""
    tok = config.tokens
    bucket = Bucket(seq_len=64, max_crops=3, max_image_tokens=17, max_frames=4, max_video_tokens=18)  # per row
    return assemble(mixed_rows(np.random.default_rng(0), tok), bucket, patches_per_crop=729, patch_dim=588,
                    pad_token_id=tok.pad)
