"""Matching: the gRPC query API over the live index (top-k, range, get, delete, clusters)."""
