"""``python -m twinstream.ingestion``: gRPC Ingest API plus the items.raw consumer."""

from __future__ import annotations

from twinstream.common.config import Settings
from twinstream.common.kafka import ConsumeLoop, make_producer
from twinstream.common.runtime import ServiceRuntime
from twinstream.ingestion.service import Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc


def main() -> None:
    settings = Settings.from_env("ingestion")
    producer = make_producer(settings)
    ids = AcceptedIds(settings.data_path / "ingestion-accepted.sqlite")
    service = Ingestion(settings, ids, producer)
    runtime = ServiceRuntime(
        settings,
        [ingestion_pb2.DESCRIPTOR.services_by_name["Ingestion"].full_name],
        [lambda server: ingestion_pb2_grpc.add_IngestionServicer_to_server(service, server)],
    )
    loop = ConsumeLoop(settings, settings.topics.raw, service.handle_raw, producer)
    runtime.set_serving(True)  # the gRPC API is usable before the consumer joins its group
    try:
        runtime.run_until_stopped(loop.run)
    finally:
        producer.close(timeout=5)
        ids.close()


if __name__ == "__main__":
    main()
