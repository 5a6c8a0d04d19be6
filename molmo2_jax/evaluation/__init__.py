"""Evaluation: the official Molmo2 grounding metrics (`metrics`, reading answers as the official
scorer does in `answers`, masks in `masks`), readers for the released evaluation sets (`datasets`)
and the synthetic-set evaluation the main job runs (`synthetic`)."""

from .synthetic import evaluate, format_table

__all__ = ["evaluate", "format_table"]
