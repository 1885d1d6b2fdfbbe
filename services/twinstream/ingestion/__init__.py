"""Ingestion: validates items from gRPC and items.raw, publishes them on items.accepted."""
