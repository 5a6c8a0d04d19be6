"""Molmo2 preprocessing without torch: images, multi-image, video, tokenizer, chat template, batching.

Outputs match the transformers `Molmo2Processor` (keys, dtypes, shapes, values).
"""

from molmo2_jax.preprocessing.chat_template import apply_chat_template
from molmo2_jax.preprocessing.collate import Bucket, collate, pick_bucket
from molmo2_jax.preprocessing.errors import (
    BucketOverflowError,
    ImageLoadError,
    PreprocessingError,
    PromptError,
    TokenizerLoadError,
    VideoDecodeError,
)
from molmo2_jax.preprocessing.image import ImageConfig, load_image, preprocess_image
from molmo2_jax.preprocessing.processor import Molmo2Processor
from molmo2_jax.preprocessing.tokenizer import Molmo2Tokenizer
from molmo2_jax.preprocessing.video import DecodedVideo, VideoConfig, decode_video, sample_indices, sample_times

__all__ = [
    "Bucket", "BucketOverflowError", "DecodedVideo", "ImageConfig", "ImageLoadError", "Molmo2Processor",
    "Molmo2Tokenizer", "PreprocessingError", "PromptError", "TokenizerLoadError", "VideoConfig",
    "VideoDecodeError", "apply_chat_template", "collate", "decode_video", "load_image", "pick_bucket",
    "preprocess_image", "sample_indices", "sample_times",
]
