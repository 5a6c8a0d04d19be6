"""Molmo2 grounding: parse and format points, counts and tracks in answers, and draw them."""

from .draw import draw_points, draw_tracks
from .text import (
    NO_TRACKS_ANSWER,
    NONE_ANSWER,
    Grounding,
    GroundingError,
    Point,
    Track,
    format_count,
    format_points,
    format_tracks,
    parse,
    parse_count,
)

__all__ = [
    "NONE_ANSWER",
    "NO_TRACKS_ANSWER",
    "Grounding",
    "GroundingError",
    "Point",
    "Track",
    "draw_points",
    "draw_tracks",
    "format_count",
    "format_points",
    "format_tracks",
    "parse",
    "parse_count",
]
