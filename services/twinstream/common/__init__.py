"""Concerns every twinstream service shares: config, logging, metrics, gRPC runtime, Kafka loop."""
