"""Matching's answers when a backend is missing or down, against a real Milvus (a milvus-lite
server this test starts and kills) and a Triton address with nothing listening: UNAVAILABLE for
outages, an empty answer before anything is indexed, INVALID_ARGUMENT for bad content."""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from twinstream.common.config import Settings
from twinstream.common.encoding import InProcessEncoder, ItemEncoder, TritonEncoder
from twinstream.common.kafka import Outgoing
from twinstream.common.metrics import Metrics
from twinstream.common.runtime import StatusInterceptor
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import ManagedProcess, free_port
from twinstream.matching.service import Matching
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2, matching_pb2, matching_pb2_grpc

pytestmark = pytest.mark.stack


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    binary = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
    process = ManagedProcess("milvus", [binary, "server", "--data-dir", str(tmp_path / "milvus"),
                                        "--host", "127.0.0.1", "--port", str(port)],
                             {}, tmp_path / "milvus.log")
    process.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline and process.alive, process.log_tail()
            time.sleep(0.2)
    yield process, f"http://127.0.0.1:{port}"
    process.kill()


def serve(matching: Matching) -> tuple[grpc.Server, matching_pb2_grpc.MatchingStub, grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[StatusInterceptor(Metrics.unexported())])
    matching_pb2_grpc.add_MatchingServicer_to_server(matching, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, matching_pb2_grpc.MatchingStub(channel), channel


def matching(uri: str, encoders: list[ItemEncoder], published: list[Outgoing] | None = None) -> Matching:
    """Matching on ``uri``; the store commands it would publish (Deletes) land in ``published``."""
    return Matching(Settings(service="matching"), VectorStore(uri), encoders,
                    (published if published is not None else []).extend)


def query(**fields: object) -> matching_pb2.MatchRequest:
    return matching_pb2.MatchRequest(tenant="acme", **fields)  # type: ignore[arg-type]


def test_before_anything_is_indexed_a_match_is_empty_and_an_item_not_found(
        milvus: tuple[ManagedProcess, str], base_bundle: Path) -> None:
    bundle = ModelBundle.load(base_bundle)
    published: list[Outgoing] = []
    server, stub, channel = serve(matching(milvus[1], [ItemEncoder(bundle, InProcessEncoder(bundle))],
                                           published))
    try:
        content = matching_pb2.QueryContent(modality=items_pb2.TEXT, content=b"hello")
        assert list(stub.Match(query(content=content), timeout=60).results) == []
        vector = matching_pb2.QueryVector(values=[1.0] + [0.0] * (bundle.dim - 1))
        assert list(stub.Match(query(vector=vector), timeout=60).results) == []
        for call in (lambda: stub.Get(matching_pb2.GetRequest(tenant="acme", item_id="a"), timeout=30),
                     lambda: stub.GetCluster(matching_pb2.GetClusterRequest(tenant="acme", item_id="a"),
                                             timeout=30)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Delete(matching_pb2.DeleteRequest(tenant="acme", item_ids=["a"]), timeout=30).deleted == 0
        assert published == [], "nothing to delete: no store command is published"
        bad = matching_pb2.QueryContent(modality=items_pb2.RECORD, content=b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Match(query(content=bad), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        server.stop(None)


def test_triton_down_is_unavailable(milvus: tuple[ManagedProcess, str], base_bundle: Path) -> None:
    bundle = ModelBundle.load(base_bundle)
    dead = ItemEncoder(bundle, TritonEncoder(bundle, f"127.0.0.1:{free_port()}", timeout_s=5))
    server, stub, channel = serve(matching(milvus[1], [dead]))
    try:
        content = matching_pb2.QueryContent(modality=items_pb2.TEXT, content=b"hello")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Match(query(content=content), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    finally:
        channel.close()
        server.stop(None)


def test_milvus_down_is_unavailable(milvus: tuple[ManagedProcess, str], base_bundle: Path) -> None:
    bundle = ModelBundle.load(base_bundle)
    server, stub, channel = serve(matching(milvus[1], [ItemEncoder(bundle, InProcessEncoder(bundle))]))
    try:
        milvus[0].kill()
        vector = matching_pb2.QueryVector(values=[1.0] + [0.0] * (bundle.dim - 1))
        calls = [lambda: stub.Match(query(vector=vector), timeout=60),
                 lambda: stub.Get(matching_pb2.GetRequest(tenant="acme", item_id="a"), timeout=60),
                 lambda: stub.Delete(matching_pb2.DeleteRequest(tenant="acme", item_ids=["a"]), timeout=60)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    finally:
        channel.close()
        server.stop(None)
