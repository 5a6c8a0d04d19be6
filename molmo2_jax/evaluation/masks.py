"""Ground-truth masks: COCO run-length encodings decoded with pycocotools, and the point-in-mask
test of the official scorer."""

from __future__ import annotations

from typing import Any

import numpy as np


def decode_rle(mask: Any) -> np.ndarray:
    """A [H, W] uint8 mask from a COCO RLE dict (`counts` compressed or a list of runs) or a
    polygon list; an array is returned as it is."""
    if isinstance(mask, np.ndarray):
        return mask
    from pycocotools import mask as coco

    if isinstance(mask, list):  # polygons of one object, merged
        height, width = mask[0]["size"]
        return coco.decode(coco.merge(coco.frPyObjects(mask, height, width)))
    height, width = mask["size"]
    if isinstance(mask["counts"], list):
        return coco.decode(coco.frPyObjects(mask, height, width))
    counts = mask["counts"]
    return coco.decode({"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts})


def point_in_mask(point, mask: np.ndarray) -> bool:
    """Whether pixel (x, y), rounded to the nearest pixel (half to even), lies in the mask."""
    x, y = round(float(point[0])), round(float(point[1]))
    height, width = mask.shape[:2]
    return 0 <= x < width and 0 <= y < height and bool(mask[y, x])
