"""Evaluation: bits per byte and the generation engine."""
