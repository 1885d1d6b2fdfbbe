"""Indexing: decides each embedded item against the index and the batch, upserts, publishes."""
