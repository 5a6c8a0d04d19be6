"""Errors of the data pipeline; each message names the dataset, file or example at fault."""

from __future__ import annotations

from molmo2_jax.errors import Molmo2Error


class DataError(Molmo2Error):
    """A dataset, manifest or pipeline setting cannot be used."""


class BadExampleError(DataError):
    """One example cannot be turned into model inputs (missing file, corrupt media, malformed target)."""


class TooManyBadExamplesError(DataError):
    """More than the configured share of examples were bad."""
