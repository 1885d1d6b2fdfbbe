"""Embedding: consumes items.accepted, encodes on Triton, publishes items.embedded."""
