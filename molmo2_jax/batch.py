"""The model's batch contract: the input keys, where each row's visual features live, and which `<im_patch>` token
takes which pooled visual token.

Inputs are named like the transformers `Molmo2Processor` outputs, plus our own optional per-token keys:
`segment_ids` (packed examples), `position_ids` and `video_patch_mask` (non-zero at the `<im_patch>` tokens that
take video feature rows).

Visual arrays are per row (batch-local): `pixel_values` `[B, crops, 729, 588]` and `image_token_pooling`
`[B, tokens, 4]` hold each row's own crops and pooled tokens, its pooling indices counting the patches of its own
crops (crop c, patch p is `c * 729 + p`); likewise `pixel_values_videos` `[B, frames, 729, 588]` and
`video_token_pooling` `[B, tokens, 9]`. A row's pooled tokens with a valid slot go, in order, to that row's
`<im_patch>` tokens of their stream, in order. Every visual gather thus stays inside its row, on the device that
holds it (a global index would make XLA gather the whole batch's features onto every device). Padding crops are
zeros, padding pooling rows -1 (`fill_value`).

The transformers layout (the crops of the whole batch concatenated `[crops, 729, 588]`, pooling `[tokens, K]`
indexing that concatenation, pooled tokens taken in row-major order of the `<im_patch>` tokens) is converted once,
on the host, by `to_rows`. The visual-token rule lives here once: the host-side conversion and check and the
traced model all call `patch_streams`, on numpy or jax arrays alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from molmo2_jax.errors import Molmo2Error

# Model inputs, in the order the model takes them.
INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "video_patch_mask", "pixel_values",
              "image_token_pooling", "pixel_values_videos", "video_token_pooling", "position_ids", "segment_ids")
# Inputs with one value per token, `[batch, seq]`.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "video_patch_mask", "position_ids", "segment_ids")
# The two visual streams: (name, pixels key, pooling key).
STREAMS = (("image", "pixel_values", "image_token_pooling"), ("video", "pixel_values_videos", "video_token_pooling"))
# Processor outputs the model does not need (its pooling indices say where each pooled token reads).
IGNORED_KEYS = ("image_grids", "image_num_crops", "video_grids", "token_type_ids")


def fill_value(key: str) -> int:
    """What pads the input `key` to a static shape: -1 in pooling slots (no patch), 0 everywhere else (no token,
    no loss, an empty crop or frame)."""
    return -1 if key.endswith("_token_pooling") else 0


def shift_pooling(pooling: Any, offset: Any) -> Any:
    """Pooling indices `[rows, slots]` moved `offset` patches on, as when their crops or frames come after
    `offset` patches of others in one vision batch; empty slots (< 0) stay empty. numpy or jax arrays alike;
    `offset` an int or an array that broadcasts (e.g. one offset per frame)."""
    return (pooling + (pooling >= 0) * offset).astype(pooling.dtype)


class InputError(Molmo2Error):
    """Model inputs that cannot be run (unknown keys, inconsistent visual token counts, too long)."""


def video_patch_mask(given: Any = None, *, has_images: bool, has_videos: bool, what: str = "inputs") -> Any:
    """Nonzero where an `<im_patch>` token takes a video feature row (its value at other tokens is ignored):
    `given`, or, where only one visual stream is present, `has_videos` as a scalar that broadcasts.

    The released processors wrap video frames in `<frame_start>`/`<frame_end>` or, with
    `use_frame_special_tokens: false` (Molmo2-4B/8B), in `<im_start>`/`<im_end>` like images, so the tokens
    around a patch cannot tell its stream. The transformers processor's outputs hold one stream; where both are
    present, the mask must be given.
    """
    if given is not None:
        return given != 0
    if has_images and has_videos:
        raise InputError(f"{what} with both image and video features need `video_patch_mask` (1 at the video "
                         f"<im_patch> tokens) to tell their <im_patch> tokens apart; molmo2_jax's processor, "
                         f"data pipeline and packing add it")
    return has_videos


def patch_streams(input_ids: Any, image_patch_id: int, given_video_patch_mask: Any = None, *, has_images: bool,
                  has_videos: bool) -> tuple[Any, Any]:
    """`(image, video)`: boolean arrays like `input_ids` marking the `<im_patch>` tokens that take image feature
    rows and those that take video feature rows. Each row's pooled tokens of a stream go to its tokens of that
    stream in order of appearance."""
    is_patch = input_ids == image_patch_id
    video = is_patch & video_patch_mask(given_video_patch_mask, has_images=has_images, has_videos=has_videos)
    return is_patch & ~video, video


def _present(arrays: Mapping[str, Any], key: str, axis: int) -> bool:
    return arrays.get(key) is not None and np.shape(arrays[key])[axis] > 0


def _streams(arrays: Mapping[str, Any], image_patch_id: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(arrays["input_ids"])
    mask = arrays.get("video_patch_mask")
    return patch_streams(ids.reshape(-1, ids.shape[-1]), image_patch_id,
                         None if mask is None else np.asarray(mask).reshape(-1, ids.shape[-1]),
                         has_images=_present(arrays, "image_token_pooling", axis),
                         has_videos=_present(arrays, "video_token_pooling", axis))


def to_rows(arrays: Mapping[str, Any], image_patch_id: int, patches_per_crop: int = 729) -> dict[str, Any]:
    """`arrays` with each visual stream in the transformers layout (`[crops, P, D]` pixels, `[tokens, K]`
    pooling indexing the concatenation of every row's crops) moved into the per-row layout (module doc); streams
    already per row pass unchanged. Host-side numpy: each row takes its share of the kept pooled tokens (by its
    count of the stream's `<im_patch>` tokens) and the crops they read (first to last), re-indexed to them."""
    out = dict(arrays)
    selections = None
    for stream, (what, pixels_key, pooling_key) in enumerate(STREAMS):
        pooling = arrays.get(pooling_key)
        if pooling is None or np.ndim(pooling) != 2:
            continue  # absent, or already per row
        pooling = np.asarray(pooling)
        pixels = arrays.get(pixels_key)
        if pixels is None or np.ndim(pixels) != 3:
            raise InputError(f"{pooling_key} {pooling.shape} indexes the whole batch's crops, so {pixels_key} must "
                             f"be [crops, patches, values], got {None if pixels is None else np.shape(pixels)}")
        pixels = np.asarray(pixels)
        if selections is None:
            if arrays.get("input_ids") is None:
                raise InputError("model inputs need 'input_ids'")
            selections = _streams(arrays, image_patch_id, axis=0)
        counts = selections[stream].sum(axis=1)
        kept = pooling[np.any(pooling >= 0, axis=-1)]
        if len(kept) != counts.sum():
            raise InputError(f"{int(counts.sum())} {what} <im_patch> tokens but {len(kept)} {what} feature rows in "
                             f"{pooling_key}; inputs must come from the same processor call")
        if kept.size and kept.max() >= len(pixels) * patches_per_crop:
            raise InputError(f"{pooling_key} reads patch {int(kept.max())} but {pixels_key} holds "
                             f"{len(pixels) * patches_per_crop} patches ({len(pixels)} crops)")
        per_row = np.split(kept, np.cumsum(counts)[:-1])
        first = [int(rows[rows >= 0].min()) // patches_per_crop if len(rows) else 0 for rows in per_row]
        last = [int(rows.max()) // patches_per_crop + 1 if len(rows) else 0 for rows in per_row]
        crops = max((b - a for a, b in zip(first, last)), default=0)
        tokens = max((len(rows) for rows in per_row), default=0)
        row_pixels = np.zeros((len(per_row), crops, *pixels.shape[1:]), pixels.dtype)
        row_pooling = np.full((len(per_row), tokens, pooling.shape[1]), fill_value(pooling_key), pooling.dtype)
        for r, (rows, a, b) in enumerate(zip(per_row, first, last)):
            row_pixels[r, : b - a] = pixels[a:b]
            row_pooling[r, : len(rows)] = shift_pooling(rows, -a * patches_per_crop)
        out[pixels_key], out[pooling_key] = row_pixels, row_pooling
    return out


def check_rows(arrays: Mapping[str, Any], image_patch_id: int) -> None:
    """Raise InputError naming the input when per-row visual arrays do not fit the tokens: a row whose count of a
    stream's `<im_patch>` tokens differs from its kept pooled tokens, a pooling index past its row's crops, or
    shapes that are not `[B, crops, P, D]` / `[B, tokens, K]` over the rows of `input_ids`."""
    batch = np.shape(arrays["input_ids"])[0]
    selections = _streams(arrays, image_patch_id, axis=1)
    for (what, pixels_key, pooling_key), selected in zip(STREAMS, selections):
        pooling, pixels = arrays.get(pooling_key), arrays.get(pixels_key)
        if pooling is None:
            rows = np.zeros(batch, np.int64)
        else:
            pooling = np.asarray(pooling)
            if pooling.ndim != 3 or pooling.shape[0] != batch:
                raise InputError(f"{pooling_key} has shape {pooling.shape}; expected [batch={batch}, tokens, slots]")
            rows = np.any(pooling >= 0, axis=-1).sum(axis=1)
            if rows.any() and pixels is None:
                raise InputError(f"{pooling_key} given without {pixels_key}")
        if pixels is not None and (np.ndim(pixels) != 4 or np.shape(pixels)[0] != batch):
            raise InputError(f"{pixels_key} has shape {np.shape(pixels)}; expected [batch={batch}, crops, patches, "
                             f"values]")
        counts = selected.sum(axis=1)
        wrong = np.flatnonzero(counts != rows)
        if len(wrong):
            r = int(wrong[0])
            raise InputError(f"row {r}: {int(counts[r])} {what} <im_patch> tokens but {int(rows[r])} {what} feature "
                             f"rows in {pooling_key}; inputs must come from the same processor call")
        if rows.any():
            patches = np.shape(pixels)[1] * np.shape(pixels)[2]
            if pooling.max() >= patches:
                r = int(np.argmax(pooling.max(axis=(1, 2))))
                raise InputError(f"row {r}: {pooling_key} reads patch {int(pooling[r].max())} but a row of "
                                 f"{pixels_key} holds {patches} patches ({np.shape(pixels)[1]} crops)")
