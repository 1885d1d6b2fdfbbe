"""``python -m twinstream.matching``: the Matching gRPC API."""

from __future__ import annotations

from twinstream.common.bundle import load_bundles
from twinstream.common.config import Settings
from twinstream.common.encoding import TritonTLS, make_encoder
from twinstream.common.kafka import make_producer, publish
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.security import milvus_client_options
from twinstream.common.vectorstore import VectorStore
from twinstream.matching.service import Matching
from twinstream.v1 import matching_pb2, matching_pb2_grpc


def main() -> None:
    settings = Settings.from_env("matching")
    store = VectorStore(settings.milvus_uri, prefix=settings.milvus_collection_prefix,
                        connection=milvus_client_options(settings))
    encoders = [make_encoder(b, settings.encoder_backend, settings.triton_url,
                             TritonTLS.from_settings(settings))
                for b in load_bundles(settings.model_dir)]
    producer = make_producer(settings)  # store commands (Delete) to indexing
    service = Matching(settings, store, encoders, lambda messages: publish(producer, messages))
    runtime = ServiceRuntime(
        settings,
        [matching_pb2.DESCRIPTOR.services_by_name["Matching"].full_name],
        [lambda server: matching_pb2_grpc.add_MatchingServicer_to_server(service, server)],
    )
    runtime.run_until_stopped()


if __name__ == "__main__":
    main()
