"""Pack several examples per sequence into static-shape training batches.

Examples (from `conversation.tokenize_conversation`) are placed first-fit, looking ahead over a small
window of upcoming examples, into the rows of a batch whose sequence length and per-row vision budgets (crops,
pooled image tokens, frames, pooled video tokens) come from the largest bucket; the batch is then
padded to the smallest bucket that holds it. Each example keeps its own segment id (1.. per row, 0 on
padding) and positions restarting at 0, so attention, the bidirectional image block and positions stay
inside it. The crops and frames of a row's examples are that row's; its pooling indices count them (the batch
contract of `molmo2_jax.batch`).

Batch keys: `input_ids`, `mm_token_type_ids`, `video_patch_mask`, `segment_ids`, `position_ids`,
`attention_mask`, `target_ids`, `loss_weights` `[B, T]`; `pixel_values` `[B, crops, P, D]`, `image_token_pooling`
`[B, image_tokens, 4]`, `pixel_values_videos` `[B, frames, P, D]`, `video_token_pooling` `[B, video_tokens, 9]`
(the training batch contract; a bucket's vision limits are per row). Padding crops / frames are zeros that no
pooling row reads, padding pooling rows are -1; `vision_masks` gives the per-crop / per-frame validity masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from molmo2_jax.batch import INPUT_KEYS as MODEL_KEYS  # noqa: F401 (molmo2_jax.data exports it)
from molmo2_jax.batch import fill_value, shift_pooling, video_patch_mask
from molmo2_jax.data.errors import DataError
from molmo2_jax.preprocessing.collate import Bucket

_VISION = (("pixel_values", "image_token_pooling", "max_crops", "max_image_tokens", 4),
           ("pixel_values_videos", "video_token_pooling", "max_frames", "max_video_tokens", 9))


def example_needs(example: Mapping[str, Any]) -> dict[str, int]:
    """Tokens, crops, pooled image tokens, frames and pooled video tokens one example takes."""
    def rows(key: str) -> int:
        return int(np.shape(example[key])[0]) if key in example else 0
    return {"seq_len": len(example["input_ids"]), "max_crops": rows("pixel_values"),
            "max_image_tokens": rows("image_token_pooling"), "max_frames": rows("pixel_values_videos"),
            "max_video_tokens": rows("video_token_pooling")}


def largest(buckets: Sequence[Bucket]) -> Bucket:
    """A bucket with every limit at its maximum over `buckets`."""
    if not buckets:
        raise DataError("packing needs at least one bucket")
    return Bucket(*(max(getattr(b, f) for b in buckets) for f in Bucket.__dataclass_fields__))


def check_fits(example: Mapping[str, Any], bucket: Bucket) -> None:
    """Raise `DataError` naming the example and the limit when it cannot fit even an empty batch."""
    for key, need in example_needs(example).items():
        if need > getattr(bucket, key):
            raise DataError(f"{example.get('name', 'example')}: needs {key}={need} but the largest bucket "
                            f"allows {getattr(bucket, key)}")


class BatchBuilder:
    """Rows of one batch under construction, first-fit."""

    def __init__(self, batch_size: int, capacity: Bucket):
        self.capacity = capacity
        self.rows: list[list[Mapping[str, Any]]] = [[] for _ in range(batch_size)]
        self.used = [dict.fromkeys(Bucket.__dataclass_fields__, 0) for _ in range(batch_size)]  # per row

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, example: Mapping[str, Any]) -> bool:
        """Place `example` in the first row with room for its tokens and vision; False if none has."""
        needs = example_needs(example)
        for row, used in zip(self.rows, self.used):
            if all(used[k] + needs[k] <= getattr(self.capacity, k) for k in used):
                row.append(example)
                for k in used:
                    used[k] += needs[k]
                return True
        return False

    def smallest_bucket(self, buckets: Sequence[Bucket]) -> Bucket:
        need = {k: max(used[k] for used in self.used) for k in Bucket.__dataclass_fields__}
        fitting = [b for b in buckets if all(getattr(b, k) >= v for k, v in need.items())]
        return min(fitting, key=lambda b: (b.seq_len, b.max_crops + b.max_frames,
                                           b.max_image_tokens + b.max_video_tokens)) if fitting else self.capacity


def assemble(rows: Sequence[Sequence[Mapping[str, Any]]], bucket: Bucket, *, patches_per_crop: int, patch_dim: int,
             pad_token_id: int = 0, pixel_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Lay out rows of examples (in row order, then placement order) as one padded batch."""
    b, t = len(rows), bucket.seq_len
    out = {k: np.zeros((b, t), np.int32) for k in ("mm_token_type_ids", "video_patch_mask", "segment_ids",
                                                   "position_ids", "target_ids")}
    out["input_ids"] = np.full((b, t), pad_token_id, np.int32)
    out["loss_weights"] = np.zeros((b, t), np.float32)
    for pixels_key, pooling_key, crops_limit, tokens_limit, width in _VISION:
        out[pixels_key] = np.zeros((b, getattr(bucket, crops_limit), patches_per_crop, patch_dim), pixel_dtype)
        out[pooling_key] = np.full((b, getattr(bucket, tokens_limit), width), fill_value(pooling_key), np.int32)
    for r, row in enumerate(rows):
        offset = 0
        filled = dict.fromkeys((key for stream in _VISION for key in stream[:2]), 0)  # this row's crops, tokens
        for seg, ex in enumerate(row, start=1):
            n = len(ex["input_ids"])
            sl = slice(offset, offset + n)
            out["input_ids"][r, sl] = ex["input_ids"]
            out["mm_token_type_ids"][r, sl] = ex["mm_token_type_ids"]
            out["video_patch_mask"][r, sl] = video_patch_mask(
                ex.get("video_patch_mask"), has_images="pixel_values" in ex, has_videos="pixel_values_videos" in ex,
                what=ex.get("name", "example"))
            out["segment_ids"][r, sl] = seg
            out["position_ids"][r, sl] = np.arange(n)
            out["target_ids"][r, offset : offset + n - 1] = ex["input_ids"][1:]
            out["loss_weights"][r, offset : offset + n - 1] = ex["token_weights"][1:]
            offset += n
            for pixels_key, pooling_key, *_ in _VISION:
                if pixels_key not in ex:
                    continue
                pixels, pooling = np.asarray(ex[pixels_key]), np.asarray(ex[pooling_key])
                crop, tok = filled[pixels_key], filled[pooling_key]
                out[pixels_key][r, crop : crop + len(pixels)] = pixels
                out[pooling_key][r, tok : tok + len(pooling)] = shift_pooling(pooling, crop * patches_per_crop)
                filled[pixels_key], filled[pooling_key] = crop + len(pixels), tok + len(pooling)
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    return out


def vision_masks(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`crop_mask` `[B, crops]` / `frame_mask` `[B, frames]`: True on the crops / frames some pooling row of
    their row reads."""
    out = {}
    for (pixels_key, pooling_key, *_), name in zip(_VISION, ("crop_mask", "frame_mask")):
        pixels, pooling = batch[pixels_key], np.asarray(batch[pooling_key])
        mask = np.zeros(pixels.shape[:2], bool)
        rows, _, _ = np.nonzero(pooling >= 0)
        mask[rows, pooling[pooling >= 0] // pixels.shape[2]] = True
        out[name] = mask
    return out


def fill_stats(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Share of real tokens, of real crops and of real frames in a packed batch, and its example count."""
    def share(mask: np.ndarray) -> float:
        return float(mask.mean()) if mask.size else 1.0
    masks = vision_masks(batch)
    return {"token_share": share(batch["segment_ids"] > 0), "crop_share": share(masks["crop_mask"]),
            "frame_share": share(masks["frame_mask"]), "examples": int(batch["segment_ids"].max(axis=1).sum())}


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    batch_size: int  # rows per batch
    buckets: tuple[Bucket, ...]
    patches_per_crop: int = 729
    patch_dim: int = 588
    lookahead: int = 16  # upcoming examples considered for the free space of a batch
    pad_token_id: int = 0


class PackIterDataset(grain.IterDataset):
    """Packs a stream of examples into batches (see module doc). Deterministic and checkpointable."""

    def __init__(self, parent: grain.IterDataset, config: PackingConfig):
        super().__init__(parent)
        self.config = config

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self.config)

    def __str__(self) -> str:
        return f"PackIterDataset(batch_size={self.config.batch_size}, buckets={len(self.config.buckets)})"


class PackIterator(grain.DatasetIterator):
    """State: the parent's state before the oldest example not yet emitted, how many examples were read
    since, and which of those are already in emitted batches. Restoring re-reads that short window."""

    def __init__(self, parent: grain.DatasetIterator, config: PackingConfig):
        super().__init__(parent)
        self.config = config
        self.capacity = largest(config.buckets)
        self._pending: list[tuple[int, Any, Mapping[str, Any]]] = []  # (read index, parent state before, example)
        self._read = 0  # examples read from the parent so far
        self._consumed: set[int] = set()  # read indices already emitted, newer than the oldest pending one
        self._exhausted = False
        self._state_at_read = self._parent.get_state()

    def _read_one(self) -> bool:
        state = self._parent.get_state()
        try:
            example = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return False
        check_fits(example, self.capacity)
        self._pending.append((self._read, state, example))
        self._read += 1
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        batch = BatchBuilder(self.config.batch_size, self.capacity)
        while True:
            while len(self._pending) < self.config.lookahead and not self._exhausted and self._read_one():
                pass
            placed = [entry for entry in self._pending if batch.add(entry[2])]
            if not placed:
                break
            self._consumed.update(index for index, _, _ in placed)
            self._pending = [entry for entry in self._pending if entry[0] not in self._consumed]
        if not len(batch):
            raise StopIteration
        oldest = self._pending[0][0] if self._pending else self._read
        self._consumed = {i for i in self._consumed if i > oldest}
        if self._pending:
            self._state_at_read = self._pending[0][1]
        else:
            self._state_at_read = self._parent.get_state()
        bucket = batch.smallest_bucket(self.config.buckets)
        return assemble(batch.rows, bucket, patches_per_crop=self.config.patches_per_crop,
                        patch_dim=self.config.patch_dim, pad_token_id=self.config.pad_token_id)

    def get_state(self) -> dict[str, Any]:
        oldest = self._pending[0][0] if self._pending else self._read
        return {"parent": self._state_at_read, "window": self._read - oldest,
                "consumed": sorted(i - oldest for i in self._consumed if i >= oldest)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._read, self._exhausted = [], 0, False
        consumed = set(state["consumed"])
        self._consumed = set()
        self._state_at_read = state["parent"]
        for offset in range(state["window"]):
            if not self._read_one():
                break
            if offset in consumed:
                self._consumed.add(self._pending.pop()[0])
