"""The model's batch contract: the input keys, and which `<im_patch>` token takes which visual feature row.

Inputs are named like the transformers `Molmo2Processor` outputs, plus our own optional per-token keys:
`segment_ids` (packed examples), `position_ids` and `video_patch_mask` (non-zero at the `<im_patch>` tokens that
take video feature rows). The visual-token rule lives here once; the host-side input check and the traced model both
call `patch_streams`, on numpy or jax arrays alike.
"""

from __future__ import annotations

from typing import Any

from molmo2_jax.errors import Molmo2Error

# Model inputs, in the order the model takes them.
INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "video_patch_mask", "pixel_values",
              "image_token_pooling", "pixel_values_videos", "video_token_pooling", "position_ids", "segment_ids")
# Inputs with one value per token, `[batch, seq]`.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "video_patch_mask", "position_ids", "segment_ids")
# Processor outputs the model does not need (its pooling indices are already global).
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
    rows and those that take video feature rows. Each stream's rows go to its tokens in order of appearance,
    row-major over batch then sequence."""
    is_patch = input_ids == image_patch_id
    video = is_patch & video_patch_mask(given_video_patch_mask, has_images=has_images, has_videos=has_videos)
    return is_patch & ~video, video
