"""Evaluation: bits-per-byte scoring of held-out documents and the `retroserve eval` commands."""
