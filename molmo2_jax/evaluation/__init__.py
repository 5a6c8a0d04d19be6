"""Evaluation: the official Molmo2 grounding metrics (`metrics`, reading answers as the official
scorer does in `answers`, masks in `masks`), readers for the released evaluation sets (`datasets`),
a model's answers to their questions (`answering`) and the held-out synthetic-set evaluation the main
job runs (`synthetic`, with its plot and drawings in `report`)."""
