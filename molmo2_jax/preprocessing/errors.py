"""Errors a user can cause while preparing model inputs; each message names the offending input."""

from molmo2_jax.errors import Molmo2Error


class PreprocessingError(Molmo2Error):
    """Base class: bad input to the Molmo2 preprocessing pipeline."""


class ImageLoadError(PreprocessingError):
    """An image cannot be read or converted (missing, truncated, unknown format, bad array)."""


class VideoDecodeError(PreprocessingError):
    """A video cannot be opened or decoded (missing, empty, corrupt, no video stream)."""


class PromptError(PreprocessingError):
    """Prompt placeholders do not match the media passed, or the chat messages are malformed."""


class TokenizerLoadError(PreprocessingError):
    """A tokenizer / processor directory is missing files or lacks the Molmo2 special tokens."""


class BucketOverflowError(PreprocessingError):
    """An example does not fit the static shapes (sequence, crops, frames or pooled tokens) of a bucket."""
