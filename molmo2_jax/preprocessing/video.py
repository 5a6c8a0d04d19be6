"""Video input: PyAV decoding of only the sampled frames, the released time-based sampling, per-frame patches.

Sampling follows the released (hub) Molmo2 processor: at most `max_fps` frames per
second, at most `num_frames` frames, the last frame always included, uniform spacing past the limit.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from molmo2_jax.batch import shift_pooling
from molmo2_jax.preprocessing.errors import VideoDecodeError
from molmo2_jax.preprocessing.image import ImageConfig, arange_for_pooling, normalize, patchify, resize_bilinear

VideoSource = str | os.PathLike | bytes


@dataclass(frozen=True)
class VideoConfig:
    """Video settings as in the released `video_preprocessor_config.json`."""

    size: int = 378
    patch_size: int = 14
    pooling_size: tuple[int, int] = (3, 3)
    num_frames: int = 384
    max_fps: float = 2.0
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoConfig:
        """Build from a (released or transformers-saved) video processor config dict."""
        img = ImageConfig.from_dict(d)
        kw: dict[str, Any] = {"size": img.size, "patch_size": img.patch_size, "image_mean": img.image_mean,
                              "image_std": img.image_std, "rescale_factor": img.rescale_factor}
        if "pooling_size" in d:
            kw["pooling_size"] = tuple(d["pooling_size"])
        if d.get("num_frames"):
            kw["num_frames"] = int(d["num_frames"])
        if d.get("max_fps"):
            kw["max_fps"] = float(d["max_fps"])
        return cls(**kw)

    @property
    def image_config(self) -> ImageConfig:
        return ImageConfig(size=self.size, patch_size=self.patch_size, pooling_size=self.pooling_size,
                           image_mean=self.image_mean, image_std=self.image_std, rescale_factor=self.rescale_factor)


def sample_times(duration: float, num_frames: int = 384, max_fps: float = 2.0) -> np.ndarray:
    """Released time-based rule: times (s) at which to take frames of a `duration`-second video."""
    if duration <= (num_frames - 1) / max_fps:
        return np.concatenate([np.arange(0.0, duration, 1.0 / max_fps), [duration]])
    return np.linspace(0.0, duration, num=num_frames, endpoint=True, dtype=np.float64)


def sample_indices(total_frames: int, fps: float, num_frames: int = 384, max_fps: float = 2.0) -> np.ndarray:
    """Released index-based rule for an already-decoded frame array recorded at `fps`."""
    if total_frames <= 2:
        return np.arange(total_frames)
    if total_frames / fps > (num_frames - 1) / max_fps:
        return np.linspace(0, total_frames - 1, num=min(num_frames, total_frames), endpoint=True).astype(int)
    idx = np.arange(0.0, total_frames - 1, fps / max_fps)
    if np.round(idx[-1]) != total_frames - 1:
        idx = np.concatenate([idx, [total_frames - 1]])
    return np.round(idx).astype(int)


@dataclass
class DecodedVideo:
    """Sampled frames of one video and the time (s) the prompt shows for each."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    timestamps: np.ndarray  # [T] float64
    fps: float | None = None
    duration: float | None = None
    frames_converted: int = 0  # frames turned into RGB arrays (== number of distinct sampled frames)
    frames_decoded: int = 0  # frames that came out of the decoder (seeking skips the rest)


def _reason(e: Exception) -> str:
    """FFmpeg's message without the errno / file-name decoration."""
    return getattr(e, "strerror", None) or str(e)


def _open(source: Any, label: str):
    import av

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise VideoDecodeError(f"video file not found: {label}")
        if path.stat().st_size == 0:
            raise VideoDecodeError(f"cannot decode video {label}: the file is empty (0 bytes)")
        target: Any = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoDecodeError(f"cannot decode video {label}: it is empty (0 bytes)")
        target = io.BytesIO(bytes(source))
    else:
        raise VideoDecodeError(f"unsupported video input of type {type(source).__name__} ({label})")
    try:
        container = av.open(target, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"cannot decode video {label}: {_reason(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"cannot decode video {label}: it has no video stream")
    return container


def decode_video(
    source: VideoSource,
    *,
    num_frames: int = 384,
    max_fps: float = 2.0,
    resize_to: int | None = None,
    name: str | None = None,
    clip: tuple[float, float] | None = None,
) -> DecodedVideo:
    """Decode the frames the released sampling rule picks from a video file or its bytes.

    With `clip` = (start, end) seconds, only that part is sampled, as Ai2's loaders do
    (`olmo/data/video_loader.py`): the rule runs over the clip's length (an end past the video is cut to
    it) and the timestamps count from the clip's start. A clip starting at or past the end, or
    ending before it starts, is an error.

    Packet timestamps are read first (no decoding) to get the duration and frame times; then only
    the chosen frames are decoded (seeking to the keyframe before each one when that skips work) and
    converted to RGB. With `resize_to`, each frame is resized to that square size as soon as it is
    decoded, so a long, large video never sits in memory. Raises `VideoDecodeError` naming the input.
    """
    import av

    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>")
    container = _open(source, label)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        try:
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size > 0]
        except av.FFmpegError as e:
            raise VideoDecodeError(f"cannot decode video {label}: {_reason(e)}") from None
        if not packets:
            raise VideoDecodeError(f"cannot decode video {label}: it contains no video frames")
        pts = np.array(sorted(p for p, _ in packets), dtype=np.int64)
        keyframes = np.array(sorted(p for p, key in packets if key), dtype=np.int64)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else len(pts) / max(float((pts[-1] - pts[0]) * tb), 1e-6)
        start = Fraction(int(pts[0])) * tb
        end = None if stream.duration is None else Fraction(stream.duration) * tb
        if end is None or end < Fraction(int(pts[-1])) * tb:
            end = Fraction(int(pts[-1])) * tb + 1 / Fraction(fps)  # guess the last frame's length
        duration = float(end - start)
        offset = float(start)
        if clip is not None:
            _check_clip(clip, duration, label)
            offset += clip[0]

        times = sample_times(duration if clip is None else min(clip[1], duration) - clip[0], num_frames, max_fps)
        # Frame i is shown until frame i+1 starts; take the frame on screen at each sampled time.
        frame_end = np.append(pts[1:].astype(np.float64) * float(tb), float(start) + duration)
        index = np.minimum(np.searchsorted(frame_end, times + offset, side="right"), len(pts) - 1)
        wanted = pts[np.unique(index)]
        decoded, n_decoded = _decode_selected(container, stream, wanted, keyframes, resize_to, label)
        frames = np.stack([decoded[int(p)] for p in pts[index]])
    finally:
        container.close()
    # The released processor stores `times * fps` as frame indices and prints index / fps.
    timestamps = (times * fps) / fps
    return DecodedVideo(frames, timestamps, fps=fps, duration=duration, frames_converted=len(decoded),
                        frames_decoded=n_decoded)


def _check_clip(clip: tuple[float, float], duration: float, label: str) -> None:
    start, end = clip
    if not (0 <= start < end) or start >= duration:
        raise VideoDecodeError(f"video {label}: clip {start}-{end} s is not inside the {duration:.2f} s video")


def _decode_selected(container, stream, wanted: np.ndarray, keyframes: np.ndarray, resize_to: int | None,
                     label: str) -> tuple[dict[int, np.ndarray], int]:
    """Decode and convert only the frames whose pts are in sorted `wanted`; also count decoded frames."""
    import av

    out: dict[int, np.ndarray] = {}
    n_decoded = 0
    frames = None
    last = None  # pts of the last decoded frame
    try:
        for target in wanted.tolist():
            key_pos = np.searchsorted(keyframes, target, side="right") - 1
            key = int(keyframes[key_pos]) if key_pos >= 0 else None
            if frames is None or (key is not None and (last is None or last < key)):
                container.seek(key if key is not None else 0, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                n_decoded += 1
                last = frame.pts
                if frame.pts is None or frame.pts < target:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                out[target] = resize_bilinear(rgb, resize_to, resize_to) if resize_to else rgb
                break
            if target not in out:
                raise VideoDecodeError(f"cannot decode video {label}: frame at pts {target} could not be decoded")
    except av.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode video {label}: {_reason(e)}") from None
    return out, n_decoded


@dataclass
class ProcessedVideo:
    """One video's model inputs (pooling indices local to its own frames); patches uint8 until read."""

    patches: np.ndarray  # [T, patches_per_frame, patch_dim] uint8
    pooling_idx: np.ndarray  # [T * tokens_per_frame, ph*pw] int64
    grid: tuple[int, int, int]  # (T, rows, cols) of pooled tokens per frame
    timestamps: np.ndarray  # [T] float64
    config: ImageConfig

    @property
    def pixel_values(self) -> np.ndarray:
        """Normalised float32 patches (computed on each access)."""
        return normalize(self.patches, self.config)


def preprocess_frames(frames: np.ndarray, timestamps: np.ndarray, cfg: VideoConfig = VideoConfig(),
                      name: str = "video") -> ProcessedVideo:
    """Resize `[T, H, W, 3]` uint8 frames to the crop size, patchify, and build the 3x3 pooling indices."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise VideoDecodeError(
            f"{name}: frames must be a non-empty [T, H, W, 3] uint8 array, got {frames.dtype} {frames.shape}")
    if len(timestamps) != len(frames):
        raise VideoDecodeError(f"{name}: got {len(frames)} frames but {len(timestamps)} timestamps")
    patches = patchify(resize_bilinear(frames, cfg.size, cfg.size), cfg.patch_size)
    side = cfg.size // cfg.patch_size
    ph, pw = cfg.pooling_size
    per_frame = arange_for_pooling(np.arange(side * side, dtype=np.int64).reshape(side, side), ph, pw)
    offsets = np.arange(len(frames), dtype=np.int64)[:, None, None] * (side * side)
    pooling = shift_pooling(per_frame, offsets).reshape(-1, ph * pw)
    grid = (len(frames), -(-side // ph), -(-side // pw))
    return ProcessedVideo(patches, pooling, grid, np.asarray(timestamps, dtype=np.float64), cfg.image_config)
