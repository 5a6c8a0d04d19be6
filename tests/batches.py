"""Training batches for tests, in the batch contract the training step takes (molmo2_jax/data/packing.py): random
tokens, crops and pooling indices for the tiny preset, shared by the training, LoRA, fault and sharding tests."""

from __future__ import annotations

import grain
import numpy as np

from molmo2_jax.config import Molmo2Config, load_preset

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
