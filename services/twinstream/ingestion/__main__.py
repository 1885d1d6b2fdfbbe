"""``python -m twinstream.ingestion``: gRPC Ingest API plus the items.raw consumer."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from twinstream.common.config import Settings, load_settings
from twinstream.common.kafka import ConsumeLoop, GroupLag, make_producer
from twinstream.common.logs import configure_logging
from twinstream.common.metrics import Metrics
from twinstream.common.probes import DependencyMonitor, broker_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.usage import parse_service_args
from twinstream.ingestion.service import Backpressure, Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc

# The group whose progress on items.accepted bounds admission (see docs/design.md).
EMBEDDING_GROUP = "twinstream-embedding"


def main(settings: Settings | None = None) -> None:
    """Run until SIGTERM; ``settings`` default to the environment's (read once, here)."""
    settings = settings or load_settings("ingestion")
    configure_logging(settings.service, settings.server.log_level)
    metrics = Metrics.create(REGISTRY)
    producer = make_producer(settings, metrics)
    ids = AcceptedIds(settings.server.data_dir / "ingestion-accepted.sqlite")
    lag = GroupLag(settings, settings.topics.accepted, EMBEDDING_GROUP)
    backpressure = Backpressure(settings.limits.ingest_max_lag, lag.measure, metrics=metrics)
    service = Ingestion(settings, ids, producer, backpressure, metrics=metrics)
    runtime = ServiceRuntime(
        settings, metrics,
        [ingestion_pb2.DESCRIPTOR.services_by_name["Ingestion"].full_name],
        [lambda server: ingestion_pb2_grpc.add_IngestionServicer_to_server(service, server)],
    )
    service.on_broker_health = runtime.health_hook("broker")
    loop = ConsumeLoop(settings, settings.topics.raw, service.handle_raw, producer,
                       on_health=runtime.health_hook("stream"), metrics=metrics)

    gate = threading.Thread(target=backpressure.run, args=(runtime.stopping,),
                            name="backpressure", daemon=True)

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.raw)],
                                runtime.health_hook, metrics)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        if settings.limits.ingest_max_lag > 0:
            gate.start()
        loop.run(stopping)

    runtime.set_serving(True)  # the gRPC API is usable before the consumer joins its group
    try:
        runtime.run_until_stopped(work)
    finally:
        producer.close(timeout=5)
        if gate.is_alive():
            gate.join(timeout=5)
        lag.close()
        ids.close()


if __name__ == "__main__":
    parse_service_args("ingestion", __doc__)
    main()
