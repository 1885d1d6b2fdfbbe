"""``python -m twinstream.ingestion``: gRPC Ingest API plus the items.raw consumer."""

from __future__ import annotations

import threading

from twinstream.common.config import Settings
from twinstream.common.kafka import ConsumeLoop, GroupLag, make_producer
from twinstream.common.probes import DependencyMonitor, broker_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.ingestion.service import Backpressure, Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc

# The group whose progress on items.accepted bounds admission (see docs/design.md).
EMBEDDING_GROUP = "twinstream-embedding"


def main() -> None:
    settings = Settings.from_env("ingestion")
    producer = make_producer(settings)
    ids = AcceptedIds(settings.data_path / "ingestion-accepted.sqlite")
    lag = GroupLag(settings, settings.topics.accepted, EMBEDDING_GROUP)
    backpressure = Backpressure(settings.ingest_max_lag, lag.measure)
    service = Ingestion(settings, ids, producer, backpressure)
    runtime = ServiceRuntime(
        settings,
        [ingestion_pb2.DESCRIPTOR.services_by_name["Ingestion"].full_name],
        [lambda server: ingestion_pb2_grpc.add_IngestionServicer_to_server(service, server)],
    )
    service.on_broker_health = runtime.health_hook("broker")
    loop = ConsumeLoop(settings, settings.topics.raw, service.handle_raw, producer,
                       on_health=runtime.health_hook("stream"))

    gate = threading.Thread(target=backpressure.run, args=(runtime.stopping,),
                            name="backpressure", daemon=True)

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.raw)],
                                runtime.health_hook)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        if settings.ingest_max_lag > 0:
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
    main()
