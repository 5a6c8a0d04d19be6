"""Pad processor outputs into the static buckets the model compiles for.

Crops / frames of all examples are concatenated (pooling indices re-offset into the concatenation)
and zero-padded; pooling rows are padded with -1 (all-invalid rows the connector drops); token
arrays are padded to `seq_len`. Every key is always present so one compiled step fits all batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from molmo2_jax.batch import fill_value, shift_pooling, video_patch_mask
from molmo2_jax.preprocessing.errors import BucketOverflowError

PATCHES_PER_CROP = 729  # 27 x 27 patches of 14 px in a 378 px crop
PATCH_DIM = 588  # 14 * 14 * 3


@dataclass(frozen=True)
class Bucket:
    """Static shapes of one compiled batch. The vision limits are totals over the batch for `collate` (the
    transformers layout, converted into rows at the model's edge) and per row for the packer
    (`molmo2_jax.data.packing`, the batch contract's per-row layout)."""

    seq_len: int
    max_crops: int
    max_image_tokens: int
    max_frames: int
    max_video_tokens: int


def example_sizes(example: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Sizes one example needs: tokens, crops, pooled image tokens, frames, pooled video tokens."""
    def rows(key: str) -> int:
        return int(example[key].shape[0]) if key in example else 0
    mask = example.get("attention_mask")
    tokens = int(np.asarray(mask).sum()) if mask is not None else int(np.asarray(example["input_ids"]).shape[-1])
    return {"seq_len": tokens, "max_crops": rows("pixel_values"),
            "max_image_tokens": rows("image_token_pooling"), "max_frames": rows("pixel_values_videos"),
            "max_video_tokens": rows("video_token_pooling")}


def pick_bucket(examples: Sequence[Mapping[str, np.ndarray]], buckets: Sequence[Bucket]) -> Bucket:
    """The smallest bucket (by padded tokens, then crops + frames) that fits the whole batch."""
    need = {k: 0 for k in Bucket.__dataclass_fields__}
    for ex in examples:
        for k, v in example_sizes(ex).items():
            need[k] = need[k] + v if k != "seq_len" else max(need[k], v)
    fitting = [b for b in buckets if all(getattr(b, k) >= v for k, v in need.items())]
    if not fitting:
        raise BucketOverflowError(f"no bucket fits the batch; it needs {need}")
    return min(fitting, key=lambda b: (b.seq_len * len(examples), b.max_crops + b.max_frames, b.max_image_tokens
                                       + b.max_video_tokens))


def _concat_visual(examples, pixel_key: str, pool_key: str, max_rows: int, max_tokens: int, pool_width: int,
                   pool_dtype, limit_names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    present = [ex for ex in examples if pixel_key in ex]
    for name, key, limit in ((limit_names[0], pixel_key, max_rows), (limit_names[1], pool_key, max_tokens)):
        per_example = [int(np.asarray(ex[key]).shape[0]) if key in ex else 0 for ex in examples]
        if sum(per_example) > limit:
            raise BucketOverflowError(f"the batch needs {name}={sum(per_example)} (per example {per_example}) "
                                      f"but the bucket allows {limit}")
    pixels = np.zeros((max_rows, PATCHES_PER_CROP, PATCH_DIM), dtype=np.float32)
    pooling = np.full((max_tokens, pool_width), fill_value(pool_key), dtype=pool_dtype)
    row = tok = 0
    for ex in present:
        pv, pool = np.asarray(ex[pixel_key]), np.asarray(ex[pool_key])
        pixels[row : row + pv.shape[0]] = pv
        pooling[tok : tok + pool.shape[0]] = shift_pooling(pool, row * PATCHES_PER_CROP)
        row += pv.shape[0]
        tok += pool.shape[0]
    return pixels, pooling


def collate(
    examples: Sequence[Mapping[str, np.ndarray]],
    *,
    seq_len: int,
    max_crops: int,
    max_image_tokens: int,
    max_frames: int,
    max_video_tokens: int,
    pad_token_id: int,
    padding_side: str = "left",
) -> dict[str, np.ndarray]:
    """Batch single-example processor outputs into fixed shapes.

    Returns `input_ids` / `attention_mask` / `mm_token_type_ids` / `video_patch_mask` `[B, seq_len]`, `pixel_values`
    `[max_crops, 729, 588]`, `image_token_pooling` `[max_image_tokens, 4]`, `pixel_values_videos`
    `[max_frames, 729, 588]`, `video_token_pooling` `[max_video_tokens, 9]`, plus the unpadded
    metadata `image_grids`, `image_num_crops`, `video_grids` (not for jitted code). Raises
    `BucketOverflowError` naming the limit when an example does not fit.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch = len(examples)
    input_ids = np.full((batch, seq_len), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int64)
    mm_types = np.zeros((batch, seq_len), dtype=np.int64)
    video_mask = np.zeros((batch, seq_len), dtype=np.int64)
    for i, ex in enumerate(examples):
        ids = np.asarray(ex["input_ids"]).reshape(-1, np.asarray(ex["input_ids"]).shape[-1])
        if ids.shape[0] != 1:
            raise ValueError(f"examples[{i}]: expected one sequence per example, got {ids.shape[0]}")
        mask = np.asarray(ex.get("attention_mask", np.ones_like(ids))).reshape(-1).astype(bool)
        valid = ids[0][mask]
        types = np.asarray(ex["mm_token_type_ids"]).reshape(-1)[mask]
        video = video_patch_mask(ex.get("video_patch_mask"), has_images="pixel_values" in ex,
                                 has_videos="pixel_values_videos" in ex, what=f"examples[{i}]")
        video = np.broadcast_to(video, ids.shape).reshape(-1)[mask]
        if len(valid) > seq_len:
            raise BucketOverflowError(f"examples[{i}] needs seq_len={len(valid)} but the bucket allows {seq_len}")
        sl = slice(seq_len - len(valid), seq_len) if padding_side == "left" else slice(0, len(valid))
        input_ids[i, sl], attention_mask[i, sl], mm_types[i, sl], video_mask[i, sl] = valid, 1, types, video

    pixel_values, image_pooling = _concat_visual(examples, "pixel_values", "image_token_pooling", max_crops,
                                                 max_image_tokens, 4, np.int32, ("max_crops", "max_image_tokens"))
    pixel_values_videos, video_pooling = _concat_visual(
        examples, "pixel_values_videos", "video_token_pooling", max_frames, max_video_tokens, 9, np.int64,
        ("max_frames", "max_video_tokens"))

    def cat(key: str, width: int) -> np.ndarray:
        parts = [np.asarray(ex[key]).reshape(-1, width) if width else np.asarray(ex[key]).reshape(-1)
                 for ex in examples if key in ex]
        empty = np.zeros((0, width) if width else (0,), dtype=np.int64)
        return np.concatenate(parts).astype(np.int64) if parts else empty

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_types,
        "video_patch_mask": video_mask,
        "pixel_values": pixel_values,
        "image_token_pooling": image_pooling,
        "pixel_values_videos": pixel_values_videos,
        "video_token_pooling": video_pooling,
        "image_grids": cat("image_grids", 4),
        "image_num_crops": cat("image_num_crops", 0),
        "video_grids": cat("video_grids", 3),
    }
