"""``python -m twinstream.matching``: the Matching gRPC API."""

from __future__ import annotations

from prometheus_client import REGISTRY

from twinstream.common.config import Settings, load_settings
from twinstream.common.encoding import TritonTLS, make_encoder
from twinstream.common.kafka import make_producer, publish
from twinstream.common.logs import configure_logging
from twinstream.common.metrics import Metrics
from twinstream.common.probes import DependencyMonitor, milvus_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.security import milvus_client_options
from twinstream.common.usage import parse_service_args
from twinstream.common.vectorstore import VectorStore
from twinstream.matching.service import Matching
from twinstream.model.bundle import load_bundles
from twinstream.v1 import matching_pb2, matching_pb2_grpc


def main(settings: Settings | None = None) -> None:
    """Run until SIGTERM; ``settings`` default to the environment's (read once, here)."""
    settings = settings or load_settings("matching")
    configure_logging(settings.service, settings.server.log_level)
    metrics = Metrics.create(REGISTRY)
    store = VectorStore(settings.milvus.uri, prefix=settings.milvus.collection_prefix,
                        metrics=metrics, connection=milvus_client_options(settings))
    encoders = [make_encoder(b, settings.encoder.backend, settings.encoder.triton_url, metrics,
                             TritonTLS.from_settings(settings))
                for b in load_bundles(settings.encoder.model_dirs)]
    producer = make_producer(settings, metrics)  # store commands (Delete) to indexing
    service = Matching(settings, store, encoders, lambda messages: publish(producer, messages))
    runtime = ServiceRuntime(
        settings, metrics,
        [matching_pb2.DESCRIPTOR.services_by_name["Matching"].full_name],
        [lambda server: matching_pb2_grpc.add_MatchingServicer_to_server(service, server)],
    )
    # Milvus only: Match by id needs no Triton, so a Triton outage does not take matching out.
    DependencyMonitor(settings, [milvus_probe(store.client)], runtime.health_hook,
                      metrics).start(runtime.stopping)
    runtime.run_until_stopped()


if __name__ == "__main__":
    parse_service_args("matching", __doc__)
    main()
