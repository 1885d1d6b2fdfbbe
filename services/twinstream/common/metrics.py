"""Every Prometheus metric of the services, built on one registry and injected.

``Metrics.create(registry)`` is called once in each service's ``__main__`` on the default
registry (the one ``/metrics`` serves) and passed to every component that counts; tests and
tools build their own on a fresh ``CollectorRegistry()``, so nothing they count leaks into
another test's numbers. Names are ``twinstream_<subsystem>_<what>_<unit>``; there is no
``service`` label: the scrape target carries ``job`` (and the local stack's and the chart's
scrape configs add ``service``). The gRPC series follow grpc-prometheus
(``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Metrics:
    """The metrics of one process; build with ``Metrics.create(registry)``."""

    items_processed: Counter
    errors: Counter
    dead_letters: Counter
    batch_records: Histogram
    batch_seconds: Histogram
    consumer_lag: Gauge
    batch_retries: Counter
    paused_partitions: Gauge
    stalled_seconds: Gauge
    backfilled: Counter
    decisions: Counter
    ingest_to_decision: Histogram
    grpc_handled: Counter
    grpc_handling: Histogram
    milvus_search: Histogram
    keyed_read: Histogram
    encoder_batch: Histogram
    dependency_up: Gauge
    dependency_probe_failures: Counter
    producer_rebuilds: Counter
    registry: CollectorRegistry  # what they are registered on (tests read samples from it)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        """Build (and register) every metric on ``registry``; once per registry."""
        r = registry
        return cls(
            items_processed=Counter(
                "twinstream_items_processed", "Items a service finished with, by outcome",
                ["outcome"], registry=r),
            errors=Counter("twinstream_errors", "Errors by reason", ["reason"], registry=r),
            dead_letters=Counter(
                "twinstream_dead_letters", "Records sent to the dead-letter topic, by reason",
                ["reason"], registry=r),
            batch_records=Histogram(
                "twinstream_stream_batch_records", "Records per processed batch",
                buckets=_BATCH_BUCKETS, registry=r),
            batch_seconds=Histogram(
                "twinstream_stream_batch_seconds", "Time to process one batch, commit included",
                buckets=_LATENCY_BUCKETS, registry=r),
            consumer_lag=Gauge(
                "twinstream_stream_consumer_lag_records", "Records behind the end of the partition",
                ["topic", "partition"], registry=r),
            batch_retries=Counter(
                "twinstream_stream_batch_retries", "Batches sought back and retried, by kind "
                "(transient: a dependency down; unisolated: every record failed unclassified)",
                ["kind"], registry=r),
            paused_partitions=Gauge(
                "twinstream_stream_paused_partitions",
                "Partitions paused while a failed batch waits for its retry", registry=r),
            stalled_seconds=Gauge(
                "twinstream_stream_stalled_seconds",
                "How long a stream loop with pending records has made no progress (0 when it does)",
                registry=r),
            backfilled=Counter(
                "twinstream_indexing_backfilled_items",
                "Items written into a model version that is not live yet (re-embedding)", registry=r),
            decisions=Counter(
                "twinstream_indexing_decisions", "Decisions published, by kind", ["kind"], registry=r),
            ingest_to_decision=Histogram(
                "twinstream_indexing_ingest_to_decision_seconds",
                "From acceptance at ingestion to the published decision",
                buckets=_LATENCY_BUCKETS, registry=r),
            grpc_handled=Counter(
                "twinstream_grpc_server_handled",
                "gRPC calls completed on the server, by final status code (an uncaught error is UNKNOWN)",
                ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=r),
            grpc_handling=Histogram(
                "twinstream_grpc_server_handling_seconds",
                "Time from the call's start to its status (a stream: to its end)",
                ["grpc_type", "grpc_service", "grpc_method"], buckets=_LATENCY_BUCKETS, registry=r),
            milvus_search=Histogram(
                "twinstream_milvus_search_seconds",
                "Milvus search latency per call (one call may carry a batch)",
                buckets=_LATENCY_BUCKETS, registry=r),
            keyed_read=Histogram(
                "twinstream_indexing_keyed_read_seconds",
                "Indexing's read of the stored records sharing a blocking key with a batch's new records",
                buckets=_LATENCY_BUCKETS, registry=r),
            encoder_batch=Histogram(
                "twinstream_encoder_batch_seconds", "Encoder call latency per batch", ["backend"],
                buckets=_LATENCY_BUCKETS, registry=r),
            # Dependency probes (common/probes.py) and producer rebuilds (common/kafka.py).
            dependency_up=Gauge(
                "twinstream_dependency_up",
                "1 while a dependency (broker, milvus, triton) answers its probe", ["dependency"],
                registry=r),
            dependency_probe_failures=Counter(
                "twinstream_dependency_probe_failures", "Dependency probes that failed or timed out",
                ["dependency"], registry=r),
            producer_rebuilds=Counter(
                "twinstream_producer_rebuilds",
                "Kafka producers closed and rebuilt after a non-retriable error", registry=r),
            registry=r,
        )

    @classmethod
    def unexported(cls) -> Metrics:
        """Metrics on a private registry nothing serves: the default of a component built
        outside a service (tools, benchmarks, tests), which has no /metrics to count for."""
        return cls.create(CollectorRegistry())



def serve_metrics(port: int, host: str = "127.0.0.1",
                  registry: CollectorRegistry = REGISTRY) -> tuple[WSGIServer, int]:
    """Start the /metrics HTTP endpoint for ``registry`` on a thread; returns the server (to
    ``shutdown()``) and the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)
