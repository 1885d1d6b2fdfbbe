"""Prometheus metrics shared by the services (one definition, labelled by service)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

ITEMS_PROCESSED = Counter(
    "twinstream_items_processed", "Items a service finished with, by outcome", ["service", "outcome"]
)
ERRORS = Counter("twinstream_errors", "Errors by reason", ["service", "reason"])
DEAD_LETTERS = Counter(
    "twinstream_dead_letters", "Records sent to the dead-letter topic", ["service", "reason"]
)
BATCH_SIZE = Histogram(
    "twinstream_batch_size", "Records per processed batch", ["service"], buckets=_BATCH_BUCKETS
)
BATCH_SECONDS = Histogram(
    "twinstream_batch_seconds", "Time to process one batch, commit included", ["service"],
    buckets=_LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "twinstream_consumer_lag", "Records behind the end of the partition",
    ["service", "topic", "partition"],
)
BATCH_RETRIES = Counter(
    "twinstream_batch_retries", "Batches sought back and retried, by kind "
    "(transient: a dependency down; unisolated: every record failed unclassified)",
    ["service", "kind"],
)
PAUSED_PARTITIONS = Gauge(
    "twinstream_paused_partitions", "Partitions paused while a failed batch waits for its retry",
    ["service"],
)
SECONDS_WITHOUT_PROGRESS = Gauge(
    "twinstream_seconds_without_progress",
    "How long a stream loop with pending records has made no progress (0 when it progresses)",
    ["service"],
)
BACKFILLED = Counter(
    "twinstream_backfilled", "Items written into a model version that is not live yet (re-embedding)"
)
DECISIONS = Counter("twinstream_decisions", "Decisions published, by kind", ["kind"])
INGEST_TO_DECISION = Histogram(
    "twinstream_ingest_to_decision_seconds", "From acceptance at ingestion to the published decision",
    buckets=_LATENCY_BUCKETS,
)
GRPC_REQUESTS = Counter(
    "twinstream_grpc_requests", "gRPC calls by method and status code", ["service", "method", "code"]
)
GRPC_SECONDS = Histogram(
    "twinstream_grpc_seconds", "gRPC call latency", ["service", "method"], buckets=_LATENCY_BUCKETS
)
MILVUS_SEARCH_SECONDS = Histogram(
    "twinstream_milvus_search_seconds", "Milvus search latency per call (one call may carry a batch)",
    buckets=_LATENCY_BUCKETS,
)
ENCODER_SECONDS = Histogram(
    "twinstream_encoder_seconds", "Encoder call latency per batch", ["backend"],
    buckets=_LATENCY_BUCKETS,
)

# Dependency probes (common/probes.py) and producer rebuilds (common/kafka.py).
DEPENDENCY_UP = Gauge(
    "twinstream_dependency_up", "1 while a dependency (broker, milvus, triton) answers its probe",
    ["service", "dependency"],
)
DEPENDENCY_PROBE_FAILURES = Counter(
    "twinstream_dependency_probe_failures", "Dependency probes that failed or timed out",
    ["service", "dependency"],
)
PRODUCER_REBUILDS = Counter(
    "twinstream_producer_rebuilds", "Kafka producers closed and rebuilt after a non-retriable error",
    ["service"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
