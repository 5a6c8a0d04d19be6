"""Shared fixtures of the data tests: a small synthetic dataset and manifests with good and bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from molmo2_jax.data.synthetic import SyntheticConfig, encode_video

SMALL = SyntheticConfig(num_train=24, num_eval=8, seed=3)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic dataset (24 train / 8 validation examples) with its tokenizer."""
    from molmo2_jax.data.tfds_builder import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", SMALL, vocab_size=400)


def write_manifest(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_media(directory: Path) -> dict[str, Path]:
    """A PNG image, a 4-frame MPEG-4 video and a corrupt video file."""
    rng = np.random.default_rng(0)
    image = directory / "image.png"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(image)
    video = directory / "clip.mp4"
    video.write_bytes(encode_video(rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8), fps=2.0))
    corrupt = directory / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(2000))
    return {"image": image, "video": video, "corrupt": corrupt}


def qa(i: int, **media) -> dict:
    """A manifest line with one QA turn."""
    return {"id": f"qa{i}", **media, "messages": [{"role": "user", "content": f"What is item {i}?"},
                                                  {"role": "assistant", "content": f"It is item {i}."}]}
