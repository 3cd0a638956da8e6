"""Scoring fixed episode sets: the batched evaluation engine (``dfml.evaluation.batched``)."""
