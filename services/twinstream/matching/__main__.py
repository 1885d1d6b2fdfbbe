"""``python -m twinstream.matching``: the Matching gRPC API."""

from __future__ import annotations

from twinstream.common.bundle import load_bundles
from twinstream.common.config import Settings
from twinstream.common.encoding import make_encoder
from twinstream.common.kafka import make_producer, publish
from twinstream.common.probes import DependencyMonitor, milvus_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.vectorstore import VectorStore
from twinstream.matching.service import Matching
from twinstream.v1 import matching_pb2, matching_pb2_grpc


def main() -> None:
    settings = Settings.from_env("matching")
    store = VectorStore(settings.milvus_uri, settings.milvus_token, settings.milvus_collection_prefix)
    encoders = [make_encoder(b, settings.encoder_backend, settings.triton_url)
                for b in load_bundles(settings.model_dir)]
    producer = make_producer(settings)  # store commands (Delete) to indexing
    service = Matching(settings, store, encoders, lambda messages: publish(producer, messages))
    runtime = ServiceRuntime(
        settings,
        [matching_pb2.DESCRIPTOR.services_by_name["Matching"].full_name],
        [lambda server: matching_pb2_grpc.add_MatchingServicer_to_server(service, server)],
    )
    # Milvus only: Match by id needs no Triton, so a Triton outage does not take matching out.
    DependencyMonitor(settings, [milvus_probe(store.client)], runtime.health_hook).start(runtime.stopping)
    runtime.run_until_stopped()


if __name__ == "__main__":
    main()
