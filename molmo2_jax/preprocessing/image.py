"""Image preprocessing in numpy: RGB loading, torch-style bilinear resize, overlap tiling, patchify, pooling indices.

Reproduces the transformers `Molmo2ImageProcessor` without torch.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from molmo2_jax.batch import shift_pooling
from molmo2_jax.preprocessing.errors import ImageLoadError, PreprocessingError

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

@dataclass(frozen=True)
class ImageConfig:
    """Image settings as in the released `preprocessor_config.json`."""

    size: int = 378  # crop side in pixels (square)
    patch_size: int = 14
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)  # in patches
    pooling_size: tuple[int, int] = (2, 2)  # (h, w)
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        # Tiles step by the crop minus both margins; with no patch left the tiling divides by zero.
        inner = self.size // self.patch_size - sum(self.overlap_margins)
        if self.size % self.patch_size or inner <= 0 or min(self.overlap_margins) < 0:
            raise PreprocessingError(f"image processor: crop size {self.size} px must be a multiple of patch_size "
                                     f"{self.patch_size} with patches left inside overlap_margins "
                                     f"{self.overlap_margins} (got {inner} patches); use a larger crop size or "
                                     "smaller margins")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageConfig:
        """Build from a (released or transformers-saved) image/video processor config dict."""
        size = d.get("size", {"height": cls.size, "width": cls.size})
        if isinstance(size, dict):
            if size.get("height") != size.get("width"):
                raise PreprocessingError(f"Molmo2 needs a square crop size, got {size}")
            size = size["height"]
        kw: dict[str, Any] = {"size": int(size)}
        for key in ("patch_size", "max_crops"):
            if key in d:
                kw[key] = int(d[key])
        for key in ("overlap_margins", "pooling_size", "image_mean", "image_std"):
            if key in d:
                kw[key] = tuple(d[key])
        if "rescale_factor" in d:
            kw["rescale_factor"] = float(d["rescale_factor"])
        return cls(**kw)

    @property
    def patches_per_side(self) -> int:
        return self.size // self.patch_size


# ----------------------------------------------------------------------------------------------
# Loading and RGB conversion


def _describe(source: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image -> `[H, W, 3]` uint8, compositing transparency onto white like the reference.

    Deeper modes (I;16*, I, F) go through PIL's RGB conversion like the reference: values clip to 0..255.
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def array_to_rgb(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """`[H, W]`, `[H, W, 1|3|4]` uint8 or uint16 array -> `[H, W, 3]` of the same dtype (channels last).

    uint16 stays 16-bit: like the reference, `resize_bilinear` saturates it to 0..255 only after resizing.
    """
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise ImageLoadError(f"{name}: expected a uint8 or uint16 array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) == 0:
        raise ImageLoadError(f"{name}: expected an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array, "
                             f"got shape {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        # As the reference (torchvision to_dtype): blend onto white in float32, scale back truncating.
        # For uint16 the float32 scale 65535.999 is 65536, so white (1.0) comes back as 65536 and the
        # reference's cast wraps it to 0: opaque white and fully transparent pixels turn black.
        top = np.iinfo(arr.dtype).max
        f = arr.astype(np.float32) * np.float32(1 / top)
        rgb = f[..., :3] * f[..., 3:] + (np.float32(1) - f[..., 3:])
        return (rgb * np.float32(top + 0.999)).astype(np.int64).astype(arr.dtype)
    return np.ascontiguousarray(arr)


def load_image(source: ImageInput, name: str | None = None) -> np.ndarray:
    """Read an image from a path, bytes, a PIL image or an array into `[H, W, 3]` RGB.

    uint8, except a uint16 array, which stays uint16 (see `array_to_rgb`).

    Raises `ImageLoadError` naming the input when it is missing, unreadable or truncated.
    """
    label = _describe(source, name)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, label)
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(f"image file not found: {label}")
            data: Any = path
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError(f"cannot read image {label}: it is empty (0 bytes)")
            data = io.BytesIO(source)
        else:
            raise ImageLoadError(f"unsupported image input of type {type(source).__name__} ({label})")
        try:
            img = Image.open(data)
            img.load()
            img = ImageOps.exif_transpose(img)  # upright, as the reference's path loader
        except UnidentifiedImageError:
            raise ImageLoadError(f"cannot read image {label}: not a recognised image format") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"cannot read image {label}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageLoadError(f"image {label} is empty ({img.width}x{img.height})")
    return pil_to_rgb(img)


# ----------------------------------------------------------------------------------------------
# Resize (torch bilinear, align_corners=False, no antialias) and normalisation


@functools.lru_cache(maxsize=512)
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of torch's half-pixel linear interpolation."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    w0 = (np.float32(1) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


@functools.lru_cache(maxsize=512)
def _column_taps(in_w: int, out_w: int, channels: int) -> tuple[np.ndarray, ...]:
    """Width taps over a flattened `[W * C]` row: element indices and per-element weights."""
    x0, x1, w0, w1 = _linear_taps(in_w, out_w)
    ch = np.arange(channels)
    taps = ((x0[:, None] * channels + ch).ravel(), (x1[:, None] * channels + ch).ravel(),
            np.repeat(w0, channels), np.repeat(w1, channels))
    for a in taps:
        a.setflags(write=False)
    return taps


_STRIP_ROWS = 32  # output rows interpolated together: keeps the float32 temporaries in cache


@functools.lru_cache(maxsize=512)
def _row_strips(in_h: int, out_h: int) -> tuple[tuple[slice, np.ndarray, np.ndarray, np.ndarray], ...]:
    """Per strip of output rows: the source rows it reads and, for each output row, their local indices."""
    y0, y1, _, _ = _linear_taps(in_h, out_h)
    strips = []
    for top in range(0, out_h, _STRIP_ROWS):
        sl = slice(top, min(top + _STRIP_ROWS, out_h))
        rows = np.union1d(y0[sl], y1[sl])
        strips.append((sl, rows, np.searchsorted(rows, y0[sl]), np.searchsorted(rows, y1[sl])))
    return tuple(strips)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize `[..., H, W, C]` uint8 or uint16 to `[..., height, width, C]` uint8 like the reference.

    torch's kernel in float32 (width taps per source row, then the two rows), rounded half to even
    and clamped to 0..255 (so 16-bit values saturate after interpolation, as in the reference).
    Works per image and per strip of output rows, interpolating only the source rows each strip reads.
    """
    *lead, in_h, in_w, channels = image.shape
    if (in_h, in_w) == (height, width):
        return image if image.dtype == np.uint8 else np.minimum(image, 255).astype(np.uint8)
    _, _, wy0, wy1 = _linear_taps(in_h, height)
    c0, c1, wc0, wc1 = _column_taps(in_w, width, channels)
    src = image.reshape(-1, in_h, in_w * channels)
    out = np.empty((src.shape[0], height, width * channels), dtype=np.uint8)
    for n in range(src.shape[0]):
        for sl, rows, r0, r1 in _row_strips(in_h, height):
            band = np.take(src[n], rows, axis=0)
            flat = np.multiply(np.take(band, c0, axis=-1), wc0, dtype=np.float32)  # integers -> float32 exactly
            flat += np.multiply(np.take(band, c1, axis=-1), wc1, dtype=np.float32)
            strip = np.take(flat, r0, axis=0)
            strip *= wy0[sl, None]
            bottom = np.take(flat, r1, axis=0)
            bottom *= wy1[sl, None]
            strip += bottom
            np.rint(strip, out=strip)
            np.clip(strip, 0, 255, out=strip)
            out[n, sl] = strip
    return out.reshape(*lead, height, width, channels)


def normalize(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """uint8 pixels (channels interleaved last) -> float32 `(x - mean*255) / (std*255)`.

    The reference's fused rescale + normalise, with the same float32 operations.
    """
    inv = np.float32(1.0 / cfg.rescale_factor)
    mean = (np.asarray(cfg.image_mean, dtype=np.float32) * inv).astype(np.float32)
    std = (np.asarray(cfg.image_std, dtype=np.float32) * inv).astype(np.float32)
    out = np.empty(pixels.shape, dtype=np.float32)
    if np.all(mean == mean[0]) and np.all(std == std[0]):  # scalar statistics: fastest path
        np.subtract(pixels, mean[0], out=out, dtype=np.float32)
        out /= std[0]
        return out
    view = out.reshape(-1, len(mean))
    np.subtract(pixels.reshape(-1, len(mean)), mean, out=view, dtype=np.float32)
    view /= std
    return out


def patchify(crops: np.ndarray, patch_size: int) -> np.ndarray:
    """`[N, S, S, C]` -> `[N, (S/p)^2, p*p*C]`: patches row-major, pixels (row, col, channel) inside."""
    n, h, w, c = crops.shape
    ph, pw = h // patch_size, w // patch_size
    x = crops.reshape(n, ph, patch_size, pw, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, ph * pw, patch_size * patch_size * c)


# ----------------------------------------------------------------------------------------------
# Tiling and pooling-index arithmetic


def select_tiling(height: float, width: float, patch_size: int, max_crops: int) -> tuple[int, int]:
    """Rows x cols of crops for an image (float32 arithmetic, ties broken as the reference)."""
    tilings = sorted(
        ((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    cand = np.asarray(tilings, dtype=np.int32) * patch_size
    with np.errstate(divide="ignore"):
        scales = cand.astype(np.float32) / np.asarray([height, width], dtype=np.float32)
    scale = scales.min(axis=-1)
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]
    scale = np.where(scale < 1.0, np.float32(1e10), scale)
    return tilings[int(np.argmin(scale))]


def arange_for_pooling(index_grid: np.ndarray, pool_h: int, pool_w: int) -> np.ndarray:
    """Group an `[h, w]` patch-index grid into `[rows * cols, pool_h * pool_w]` windows, padding with -1.

    Odd padding goes to the bottom / right.
    """
    h, w = index_grid.shape
    pad_h = -h % pool_h
    pad_w = -w % pool_w
    grid = np.pad(index_grid, [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)], constant_values=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    return grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)


@dataclass(frozen=True)
class Tiling:
    """Geometry of one image's crops and its pooled token grid."""

    rows: int  # crops vertically
    cols: int  # crops horizontally
    canvas_height: int
    canvas_width: int
    pooling_idx: np.ndarray  # [low_h*low_w + high_h*high_w, ph*pw] int32, local to the image
    grid: tuple[int, int, int, int]  # (low_h, low_w, high_h, high_w)

    @property
    def num_crops(self) -> int:
        return 1 + self.rows * self.cols


@functools.lru_cache(maxsize=512)
def compute_tiling(height: int, width: int, cfg: ImageConfig) -> Tiling:
    """Tiling, canvas size and pooling indices for an image of `height` x `width` pixels."""
    left, right = cfg.overlap_margins
    crop_patches = cfg.patches_per_side
    window = (crop_patches - left - right) * cfg.patch_size
    margin = (left + right) * cfg.patch_size
    rows, cols = select_tiling(height - margin, width - margin, window, cfg.max_crops)
    canvas_h, canvas_w = rows * window + margin, cols * window + margin

    # High-res patch indices of every crop; overlap margins shared with a neighbour are dropped.
    idx = np.arange(rows * cols * crop_patches**2, dtype=np.int32).reshape(rows, cols, crop_patches, crop_patches)
    if left:
        idx[1:, :, :left, :] = -1
        idx[:, 1:, :, :left] = -1
    if right:
        idx[:-1, :, -right:, :] = -1
        idx[:, :-1, :, -right:] = -1
    idx = idx.transpose(0, 2, 1, 3).reshape(-1)
    idx = idx[idx >= 0].reshape(canvas_h // cfg.patch_size, canvas_w // cfg.patch_size)

    ph, pw = cfg.pooling_size
    high = arange_for_pooling(idx, ph, pw)
    high = shift_pooling(high, crop_patches**2)  # the global view comes first
    low = arange_for_pooling(np.arange(crop_patches**2, dtype=np.int32).reshape(crop_patches, crop_patches), ph, pw)
    pooling = np.concatenate([low, high]).astype(np.int32)
    pooling.setflags(write=False)
    grid = (-(-crop_patches // ph), -(-crop_patches // pw), -(-idx.shape[0] // ph), -(-idx.shape[1] // pw))
    return Tiling(rows, cols, canvas_h, canvas_w, pooling, grid)


@dataclass
class ProcessedImage:
    """One image's model inputs (pooling indices local to its own crops).

    Patches stay uint8 until `pixel_values` is read, so a batch can be normalised in one pass.
    """

    patches: np.ndarray  # [num_crops, patches_per_crop, patch_dim] uint8
    pooling_idx: np.ndarray  # [num_tokens, ph*pw] int32
    grid: tuple[int, int, int, int]  # (low_h, low_w, high_h, high_w)
    config: ImageConfig

    @property
    def num_crops(self) -> int:
        return self.patches.shape[0]

    @property
    def pixel_values(self) -> np.ndarray:
        """Normalised float32 patches (computed on each access)."""
        return normalize(self.patches, self.config)


def preprocess_image(image: np.ndarray, cfg: ImageConfig = ImageConfig()) -> ProcessedImage:
    """Tile one `[H, W, 3]` uint8 (or uint16, saturated when resized) image: global 378 view + overlapping crops."""
    h, w = image.shape[:2]
    tiling = compute_tiling(h, w, cfg)
    s = cfg.size
    window = (cfg.patches_per_side - sum(cfg.overlap_margins)) * cfg.patch_size
    canvas = resize_bilinear(image, tiling.canvas_height, tiling.canvas_width)
    crops = np.empty((tiling.num_crops, s, s, image.shape[-1]), dtype=np.uint8)
    crops[0] = resize_bilinear(image, s, s)
    for i in range(tiling.rows):
        for j in range(tiling.cols):
            crops[1 + i * tiling.cols + j] = canvas[i * window : i * window + s, j * window : j * window + s]
    return ProcessedImage(patchify(crops, cfg.patch_size), tiling.pooling_idx, tiling.grid, cfg)
